"""Engines behind one interface: torch and onnxruntime agree, sampling and the pipeline run unchanged
through them, and an engine that cannot load falls back loudly to torch (or raises when told to).

Tolerances vs torch fp32 (max abs error over valid frames):
  one DiT step 1e-4, one vocoder call 1e-5;
  full sampling (8 Euler steps with CFG, errors compound) 1e-3 on the mel;
  the whole TTS pipeline 1e-3 on the waveform.
"""

from __future__ import annotations

import ast
import copy
import inspect
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from f5_triton.engines import (
    DIT_INPUTS,
    DIT_OUTPUTS,
    DIT_STEP,
    VOCODER,
    VOCODER_INPUTS,
    VOCODER_OUTPUTS,
    DiTRunner,
    DiTStep,
    Engine,
    EngineConfig,
    EngineFallbackWarning,
    EngineUnavailable,
    ShapeOutOfRange,
    TorchEngine,
    VocoderNetwork,
    VocoderRunner,
    load_engine,
    make_dit_runner,
    make_vocoder_runner,
)
from f5_triton.engines.networks import output_valid_mask, random_inputs
from f5_triton.engines.tensorrt_engine import FLAVOUR_ENV, check_profile, tensorrt_available
from f5_triton.export.onnx_export import export_models
from f5_triton.model.packing import Packing
from f5_triton.sampler import sample
from f5_triton.vocoder import decode_batch

STEP_TOL, VOCODER_TOL, SAMPLE_TOL, PIPELINE_TOL = 1e-4, 1e-5, 1e-3, 1e-3


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, dit, decoder):
    out = tmp_path_factory.mktemp("onnx")
    export_models([dit, decoder], out, cases=((7,),), log=lambda line: None)
    return out


def ort_config(onnx_dir, spec, **kwargs) -> EngineConfig:
    return EngineConfig(kind="onnxruntime", path=onnx_dir / spec.onnx_file, fallback=False, **kwargs)


def max_valid_error(spec, got, expected, lengths) -> float:
    keep = output_valid_mask(spec, expected, lengths).expand_as(expected)
    return float((got - expected).abs()[keep].max())


# -- the interface --------------------------------------------------------------------------------


def test_names_are_declared_once():
    assert DIT_INPUTS == ("x", "cond", "text_embed", "time", "mask") and DIT_OUTPUTS == ("flow",)
    assert VOCODER_INPUTS == ("mel", "lengths") and VOCODER_OUTPUTS == ("waveform",)
    assert DiTStep.spec is DIT_STEP and VocoderNetwork.spec is VOCODER


def test_engine_config_validates_and_reads_strings():
    with pytest.raises(ValueError, match="engine kind"):
        EngineConfig(kind="tflite")
    config = EngineConfig.from_mapping({"kind": "onnxruntime", "path": "a.onnx", "fallback": "false",
                                        "cuda_graphs": "1", "frame_buckets": "512,256", "providers": "CPUExecutionProvider"})
    assert (config.fallback, config.cuda_graphs, config.frame_buckets) == (False, True, (256, 512))
    assert config.providers == ("CPUExecutionProvider",)
    with pytest.raises(ValueError, match="unknown engine options"):
        EngineConfig.from_mapping({"kind": "torch", "precision": "fp16"})
    with pytest.raises(ValueError, match="not a boolean"):
        EngineConfig.from_mapping({"compile": "maybe"})


def test_engine_config_from_model_parameters_and_command_options():
    """One reading of settings: a model's string parameters and a command's parsed options name them alike."""
    params = {"dit_engine": "trt", "dit_engine_path": "", "dit_cuda_graphs": "true", "dit_graph_steps": "4",
              "engine_fallback": "0", "vocoder_engine": "onnxruntime", "vocoder_engine_path": "v.onnx"}
    dit, vocoder = (EngineConfig.from_settings(params, network, "cuda:0") for network in ("dit", "vocoder"))
    assert (dit.kind, dit.path, dit.cuda_graphs, dit.compile, dit.graph_steps, dit.fallback, dit.device) == (
        "tensorrt", None, True, False, 4, False, "cuda:0")
    assert (vocoder.kind, str(vocoder.path), vocoder.cuda_graphs, vocoder.fallback) == ("onnxruntime", "v.onnx", False,
                                                                                         False)
    options = {"dit_engine": "torch", "dit_compile": True, "dit_graph_max_rows": 16, "dit_engine_path": None}
    assert EngineConfig.from_settings(options, "dit", "cpu") == EngineConfig(compile=True, graph_max_rows=16)


@pytest.mark.parametrize("spec", [DIT_STEP, VOCODER])
def test_onnxruntime_engine_matches_torch(onnx_dir, dit, decoder, spec):
    network = DiTStep(dit) if spec is DIT_STEP else VocoderNetwork(decoder)
    engine = load_engine(ort_config(onnx_dir, spec), network)
    reference = load_engine(EngineConfig(), network)
    assert isinstance(engine, Engine) and engine.kind == "onnxruntime" and reference.kind == "torch"
    for lengths in [(5,), (40, 17, 3), (128, 128)]:
        inputs = random_inputs(spec, lengths, network.static_sizes, seed=sum(lengths))
        got, expected = engine(*inputs), reference(*inputs)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert max_valid_error(spec, got, expected, lengths) <= (STEP_TOL if spec is DIT_STEP else VOCODER_TOL)


def test_engines_check_their_inputs(onnx_dir, dit):
    engine = load_engine(ort_config(onnx_dir, DIT_STEP), dit)
    x = torch.zeros(1, 4, 100)
    with pytest.raises(TypeError, match="takes 5 tensors"):
        engine(x, x)
    with pytest.raises(ValueError, match="'time'"):
        engine(x, x, torch.zeros(1, 4, 32), torch.zeros(1, 1), torch.ones(1, 4, dtype=torch.bool))


def test_torch_engine_on_cpu_ignores_gpu_options(dit):
    network = DiTStep(dit)
    inputs = random_inputs(DIT_STEP, (30, 20), network.static_sizes)
    eager = TorchEngine(network, DIT_STEP)(*inputs)
    fancy = load_engine(EngineConfig(compile=True, cuda_graphs=True), network)
    assert torch.equal(fancy(*inputs), eager)


@pytest.mark.parametrize("spec", [DIT_STEP, VOCODER])
def test_padding_frames_to_a_bucket_is_exact(dit, decoder, spec):
    """What the CUDA-graph buckets rely on: padded frames do not change the valid output."""
    network = DiTStep(dit) if spec is DIT_STEP else VocoderNetwork(decoder)
    lengths = (45, 30)
    inputs = random_inputs(spec, lengths, network.static_sizes)
    with torch.inference_mode():
        expected = network(*inputs)
        padded = network(*spec.pad_frames(inputs, 64))
    got = spec.trim_frames(padded, 45)
    assert got.shape == expected.shape
    assert max_valid_error(spec, got, expected, lengths) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{"cuda_graphs": True}, {"compile": True}, {"compile": True, "cuda_graphs": True}])
def test_torch_gpu_paths_match_eager(dit, decoder, options):
    for network in (DiTStep(copy.deepcopy(dit)).cuda(), VocoderNetwork(copy.deepcopy(decoder)).cuda()):
        spec = network.spec
        eager = TorchEngine(network, spec)
        engine = load_engine(EngineConfig(device="cuda", frame_buckets=(64, 128), **options), network)
        for lengths in [(50, 20), (100,), (50, 33), (200, 7)]:  # (200, 7) is past the largest bucket
            inputs = [t.cuda() for t in random_inputs(spec, lengths, network.static_sizes, seed=len(lengths))]
            got, expected = engine(*inputs), eager(*inputs)
            assert got.shape == expected.shape
            assert max_valid_error(spec, got.cpu(), expected.cpu(), lengths) <= 1e-3


# -- the graphed sampler: the whole Euler loop as CUDA graphs of a few steps ---------------------------

SOLVER_CASES = [  # (durations, cfg, steps): padded batch, no guidance, a remainder graph, past the largest bucket
    ((100, 80), 2.0, 8), ((90,), 0.0, 8), ((60, 60), 2.0, 7), ((150, 20), 2.0, 4)]


def sample_case(model, durations, cfg, steps, on_step=None):
    """`sample` of a seeded batch with a reference of 40 (25) frames, or of at most each duration - 1 past 2 requests;
    inputs in the model's device and dtype."""
    torch.manual_seed(0)
    batch = len(durations)
    cond = torch.randn(batch, 40, 100)
    text = torch.randint(0, 256, (batch, 30))
    text[-1, 20:] = -1
    param = next(model.model.parameters() if isinstance(model, DiTRunner) else model.parameters())
    lens = [40, 25][:batch] if batch <= 2 else [min(40, n - 1) for n in durations]
    return sample(model, cond.to(param.device, param.dtype), text.to(param.device), torch.tensor(durations),
                  steps=steps, cfg_strength=cfg, seed=list(range(batch)), lens=torch.tensor(lens),
                  on_step=on_step).cpu()


def test_graphed_solver_segments_and_pads_exactly(dit, monkeypatch):
    """The solver's own logic on the CPU: graphs of `graph_steps` steps (the CUDA capture replaced by a plain
    call), frames padded to buckets, `on_step` before each replay, calls without a graph (past the largest
    bucket, or more rows than `max_rows`) padded to a multiple of 8 frames."""
    from f5_triton import solvers

    class Replay:  # what a captured graph does, without CUDA
        def __init__(self, forward, example, pool):
            self.forward = forward

        def replay(self, inputs):
            return self.forward(*inputs)

    monkeypatch.setattr(solvers, "CapturedGraph", Replay)
    engine = TorchEngine(DiTStep(dit), DIT_STEP)
    engine.solver = solvers.GraphedSolver(engine._forward, (64, 128), 3, pool=None, lock=__import__("threading").Lock())
    runner = DiTRunner(dit, engine)
    assert runner.solver is engine.solver
    for durations, cfg, steps in SOLVER_CASES:
        seen = []
        got = sample_case(runner, durations, cfg, steps, on_step=seen.append)
        expected = sample_case(dit, durations, cfg, steps)
        assert seen == list(range(0, steps, 3)) if max(durations) <= 128 else seen == list(range(steps))
        for row, n in enumerate(durations):
            assert (got[row, :n] - expected[row, :n]).abs().max() <= 1e-4, (durations, cfg, steps)
    # keys: (rows = 2 per request with guidance, bucket, steps per graph, guidance); 8 = 3+3+2, 7 = 3+3+1
    assert set(engine.solver.graphs) == {(4, 128, 3, True), (4, 128, 2, True), (1, 128, 3, False),
                                         (1, 128, 2, False), (4, 64, 3, True), (4, 64, 1, True)}

    # batches of more than `max_rows` network rows run the same loop packed, without graphs (nor their stalls)
    frames_seen = []

    def forward(x, *rest):
        frames_seen.append("packed" if isinstance(rest[-1], Packing) else x.shape[1])
        return engine._forward(x, *rest)

    engine.solver = solvers.GraphedSolver(forward, (64, 128), 3, pool=None,
                                          lock=__import__("threading").Lock(), max_rows=2)
    runner = DiTRunner(dit, engine)
    for durations, cfg, steps in SOLVER_CASES[:2]:
        seen = []
        got = sample_case(runner, durations, cfg, steps, on_step=seen.append)
        expected = sample_case(dit, durations, cfg, steps)
        assert seen == (list(range(steps)) if cfg else list(range(0, steps, 3)))
        for row, n in enumerate(durations):
            assert (got[row, :n] - expected[row, :n]).abs().max() <= 1e-4, (durations, cfg, steps)
    assert set(engine.solver.graphs) == {(1, 128, 3, False), (1, 128, 2, False)}
    # 2 requests with guidance (4 rows > 2): packed; 90 frames in the 128 bucket's graph
    assert set(frames_seen) == {"packed", 128}


def test_calls_without_a_graph_are_padded_to_aligned_frames(dit, monkeypatch):
    """The per-step graphs' fallback (too many rows, or past the largest bucket) pads to a multiple of
    FRAME_ALIGNMENT frames (8 here, to tell both calls apart) and trims back: same valid output, the caller's
    frame count."""
    from f5_triton import solvers
    from f5_triton.engines import torch_engine
    from f5_triton.engines.networks import random_inputs

    monkeypatch.setattr(solvers, "FRAME_ALIGNMENT", 8)

    module = DiTStep(dit).eval()
    frames_seen = []

    def forward(*inputs):
        frames_seen.append(inputs[0].shape[1])
        return module(*inputs)

    graphs = torch_engine._CudaGraphs(forward, DIT_STEP, buckets=(64,), max_rows=1)
    inputs = random_inputs(DIT_STEP, (50, 37), {"mel": 100, "text": dit.config.text_dim})  # 2 rows > max_rows
    with torch.inference_mode():
        got = graphs(inputs)
        expected = module(*inputs)
        past_buckets = graphs(random_inputs(DIT_STEP, (70,), {"mel": 100, "text": dit.config.text_dim}))
    assert frames_seen == [56, 72]
    assert got.shape == expected.shape and past_buckets.shape[1] == 70
    mask = inputs[-1]
    for row in range(2):
        n = int(mask[row].sum())
        assert (got[row, :n] - expected[row, :n]).abs().max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True])
def test_graphed_solver_matches_eager_sampling_on_gpu(dit, compile_):
    model = copy.deepcopy(dit).cuda()
    runner = make_dit_runner(model, EngineConfig(device="cuda", cuda_graphs=True, compile=compile_,
                                                 frame_buckets=(64, 128), graph_steps=3))
    assert runner.solver is not None
    for durations, cfg, steps in SOLVER_CASES:
        got = sample_case(runner, durations, cfg, steps)
        expected = sample_case(model, durations, cfg, steps)
        for row, n in enumerate(durations):
            assert (got[row, :n] - expected[row, :n]).abs().max() <= SAMPLE_TOL, (durations, cfg, steps)


# -- DiTRunner / VocoderRunner: sampling and the pipeline, unchanged ------------------------------


def test_dit_runner_accepts_no_mask_and_scalar_time(onnx_dir, dit):
    runner = make_dit_runner(dit, ort_config(onnx_dir, DIT_STEP))
    x, cond, text_embed, _, _ = random_inputs(DIT_STEP, (33, 33), {"mel": 100, "text": 32})
    time = torch.tensor(0.3)
    with torch.inference_mode():
        expected = dit.step(x, cond, text_embed, time, None)
    assert (runner.step(x, cond, text_embed, time, None) - expected).abs().max() <= STEP_TOL
    text = torch.randint(0, 100, (2, 10))
    assert torch.equal(runner.embed_text(text, torch.tensor([33, 20]), 33), dit.embed_text(text, torch.tensor([33, 20]), 33))


def _parameters(function) -> list[str]:
    return [name for name in inspect.signature(function).parameters if name != "self"]


def _keeps_the_contract(implementer, protocol, members: tuple[str, ...]) -> None:
    """`implementer` is a `protocol` (runtime check: the members exist) and each of `members` takes the protocol's
    parameters, by name and in order (what the runtime check does not see)."""
    assert isinstance(implementer, protocol), f"{type(implementer).__name__} is no {protocol.__name__}"
    for member in members:
        assert _parameters(getattr(implementer, member)) == _parameters(getattr(protocol, member)), \
            f"{type(implementer).__name__}.{member} drifted from {protocol.__name__}.{member}"


def test_step_models_keep_the_samplers_contract(onnx_dir, dit):
    """Whatever the sampler runs is a `StepModel`, with the Protocol's signatures: the eager DiT, and `DiTRunner`
    over each engine that runs here (torch eager, torch with a graphed solver, onnxruntime); each engine is an
    `Engine` (its `packs`, `cover_shapes` as declared), and each solver a `Solver`. The eager DiT and the exported
    graph's engine have no solver, cover no shapes; the DiT packs every batch, the onnxruntime engine none."""
    import threading

    from f5_triton.sampler import StepModel
    from f5_triton.solvers import EulerSolver, GraphedSolver, Solver

    step_members = ("embed_text", "step", "packs", "cover_shapes")
    torch_runner = make_dit_runner(dit, EngineConfig(cuda_graphs=True))  # on the CPU: eager, no graphs
    graphed = TorchEngine(DiTStep(dit), DIT_STEP)
    graphed.solver = GraphedSolver(graphed._forward, (64,), 3, pool=None, lock=threading.Lock())
    ort_runner = make_dit_runner(dit, ort_config(onnx_dir, DIT_STEP))
    for model in (dit, torch_runner, DiTRunner(dit, graphed), ort_runner):
        _keeps_the_contract(model, StepModel, step_members)
        assert model.solver is None or isinstance(model.solver, Solver)
        assert model.config is dit.config
    for engine in (torch_runner.engine, graphed, ort_runner.engine):
        assert isinstance(engine, Engine)
        assert _parameters(engine.packs) == _parameters(Engine.packs)
        assert _parameters(engine.cover_shapes) == _parameters(Engine.cover_shapes)
    for solver in (EulerSolver(dit.step), graphed.solver):
        _keeps_the_contract(solver, Solver, ("__call__", "steps_per_replay"))
    assert dit.solver is None and dit.packs(3) and dit.cover_shapes(4, 1000, 8) == 0
    assert ort_runner.solver is None and not ort_runner.packs(3) and ort_runner.cover_shapes(4, 1000, 8) == 0
    assert torch_runner.solver is None and torch_runner.cover_shapes(4, 1000, 8) == 0
    assert DiTRunner(dit, graphed).solver is graphed.solver
    assert EulerSolver(dit.step).steps_per_replay(None, True) == 1 and graphed.solver.steps_per_replay(None, True) == 3


# what a caller may not probe for by name: the members of `StepModel`, `Solver` and `Engine`, the runner's `model`
CONTRACT_MEMBERS = {"embed_text", "step", "solver", "solve", "packs", "cover_shapes", "steps_per_replay", "config",
                    "model"}


def _probes(source: str) -> list[str]:
    """getattr/hasattr calls that name one of CONTRACT_MEMBERS."""
    return [ast.unparse(node) for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value in CONTRACT_MEMBERS]


def test_no_probe_for_the_step_model_contract():
    """The sampler, solvers, engines, pipeline and the flow_matching adapter use the contract's members as declared,
    never probing for one by name (an implementer without one fails at once instead of running another path)."""
    assert _probes('solve = getattr(model, "solve", None) or partial(euler_solve, model.step)\n'
                   'ok = hasattr(engine, "packs") and getattr(self.engine, "kind")') == [
        "getattr(model, 'solve', None)", "hasattr(engine, 'packs')"]
    root = Path(__file__).resolve().parents[1]
    package = root / "f5_triton"
    files = [package / "sampler.py", package / "solvers.py", package / "pipeline.py",
             *sorted((package / "engines").glob("*.py")), root / "model_repo" / "flow_matching" / "1" / "model.py"]
    found = [f"{path.relative_to(root)}: {probe}" for path in files for probe in _probes(path.read_text())]
    assert not found, found


@pytest.mark.parametrize("cfg", [2.0, 0.0])
def test_sampling_through_onnxruntime_equals_torch(onnx_dir, dit, cfg):
    runner = DiTRunner(dit, load_engine(ort_config(onnx_dir, DIT_STEP), dit))
    torch.manual_seed(0)
    cond = torch.randn(2, 40, 100)
    text = torch.randint(0, 256, (2, 30))
    text[1, 20:] = -1
    kwargs = dict(steps=8, cfg_strength=cfg, seed=[1, 2], lens=torch.tensor([40, 25]))
    duration = torch.tensor([100, 80])  # padded batch: the second request is 20 frames shorter
    expected = sample(dit, cond, text, duration, **kwargs)
    got = sample(runner, cond, text, duration, **kwargs)
    assert got.shape == expected.shape == (2, 100, 100)
    assert (got[0] - expected[0]).abs().max() <= SAMPLE_TOL
    assert (got[1, :80] - expected[1, :80]).abs().max() <= SAMPLE_TOL


def test_vocoder_runner_works_with_decode_batch(onnx_dir, decoder):
    runner = make_vocoder_runner(decoder, ort_config(onnx_dir, VOCODER))
    assert isinstance(runner, VocoderRunner) and runner.kind == "onnxruntime"
    mels = [torch.randn(100, 50), torch.randn(100, 13)]
    for got, expected in zip(decode_batch(runner, mels), decode_batch(decoder, mels)):
        assert got.shape == expected.shape and np.abs(got - expected).max() <= VOCODER_TOL
    mel = torch.randn(1, 100, 20)
    with torch.inference_mode():
        assert (runner(mel) - decoder(mel)).abs().max() <= VOCODER_TOL  # no lengths: the whole input


def test_tts_pipeline_with_onnxruntime_engines(tiny_ckpt, onnx_dir):
    from f5_triton.pipeline import TTS
    from f5_triton.request import validate_request

    paths = (tiny_ckpt / "model.safetensors", tiny_ckpt / "vocab.txt", tiny_ckpt / "vocos")
    reference = TTS.from_paths(*paths)
    tts = TTS.from_paths(*paths, engine=lambda model: make_dit_runner(model, ort_config(onnx_dir, DIT_STEP)),
                         vocoder_engine=lambda decoder: make_vocoder_runner(decoder, ort_config(onnx_dir, VOCODER)))
    assert tts.flow_matching.model.kind == tts.vocoder.decoder.kind == "onnxruntime"
    t = np.arange(24_000) / 24_000
    wave = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t)).astype(np.float32)
    requests = [validate_request(wave, "a reference.", "hello there, engines.", nfe_steps=8, seed=5),
                validate_request(wave[:18_000], "short one.", "a longer text for the second request.",
                                 nfe_steps=8, seed=6)]
    for got, expected in zip(tts.synthesize(requests), reference.synthesize(requests)):
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= PIPELINE_TOL


# -- fallback ---------------------------------------------------------------------------------


def test_missing_file_falls_back_to_torch_loudly(dit, tmp_path, caplog):
    config = EngineConfig(kind="onnxruntime", path=tmp_path / "missing.onnx")
    with caplog.at_level(logging.ERROR), pytest.warns(EngineFallbackWarning, match="missing.onnx"):
        engine = load_engine(config, dit)
    assert engine.kind == "torch"
    assert any("FALLING BACK" in r.message and "missing.onnx" in r.message for r in caplog.records)
    inputs = random_inputs(DIT_STEP, (9,), {"mel": 100, "text": 32})
    with torch.inference_mode():
        assert torch.equal(engine(*inputs), dit.step(*inputs))


def test_missing_file_raises_without_fallback(dit, tmp_path):
    with pytest.raises(EngineUnavailable, match="does not exist.*export_onnx.py"):
        load_engine(EngineConfig(kind="onnxruntime", path=tmp_path / "missing.onnx", fallback=False), dit)
    with pytest.raises(EngineUnavailable, match="needs a path"):
        load_engine(EngineConfig(kind="onnxruntime", fallback=False), dit)


def test_corrupt_or_wrong_file_is_refused(onnx_dir, dit, tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with pytest.warns(EngineFallbackWarning, match="cannot load"):
        assert load_engine(EngineConfig(kind="onnxruntime", path=corrupt), dit).kind == "torch"
    with pytest.raises(EngineUnavailable, match="not a dit_step network"):
        load_engine(EngineConfig(kind="onnxruntime", path=onnx_dir / VOCODER.onnx_file, fallback=False), dit)


@pytest.mark.skipif(tensorrt_available("tensorrt"), reason="TensorRT is installed: its absence cannot be tested")
def test_tensorrt_without_the_package_falls_back_or_raises(dit, tmp_path, monkeypatch):
    monkeypatch.setenv(FLAVOUR_ENV, "tensorrt")  # tensorrt-rtx may be installed: ask for TensorRT proper
    plan = tmp_path / "dit_step.plan"
    plan.write_bytes(b"\0" * 16)
    with pytest.warns(EngineFallbackWarning, match="pip install tensorrt"):
        assert load_engine(EngineConfig(kind="tensorrt", path=plan, device="cuda"), dit).kind == "torch"
    with pytest.raises(EngineUnavailable, match="pip install tensorrt"):
        load_engine(EngineConfig(kind="tensorrt", path=plan, fallback=False), dit)


def test_onnxruntime_cuda_without_the_gpu_provider_is_refused(onnx_dir, dit):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(EngineUnavailable, match="onnxruntime-gpu"):
        load_engine(ort_config(onnx_dir, DIT_STEP, device="cuda"), dit)


def test_profile_check_names_the_input_and_the_range():
    profile = {"mel": ((1, 100, 1), (1, 100, 512), (4, 100, 4096)), "lengths": ((1,), (1,), (4,))}
    check_profile({"mel": (2, 100, 4096), "lengths": (2,)}, profile)
    with pytest.raises(ShapeOutOfRange, match=r"'mel'.*\(2, 100, 5000\).*max-frames"):
        check_profile({"mel": (2, 100, 5000), "lengths": (2,)}, profile, "vocoder")
    with pytest.raises(ShapeOutOfRange, match="'lengths'"):
        check_profile({"mel": (1, 100, 10), "lengths": (5,)}, profile)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_graphed_sampling_on_the_second_gpu(dit):
    """A Triton instance on cuda:1 runs with cuda:0 current unless told otherwise; graphs must still capture there
    (seen on a 2-GPU H200: 'beginAllocateToPool: already recording to mempool_id')."""
    model = copy.deepcopy(dit).to("cuda:1")
    runner = make_dit_runner(model, EngineConfig(device="cuda:1", cuda_graphs=True, frame_buckets=(64, 128),
                                                 graph_steps=3))
    assert torch.cuda.current_device() == 0
    for durations, cfg, steps in SOLVER_CASES:
        got = sample_case(runner, durations, cfg, steps)
        expected = sample_case(model, durations, cfg, steps)
        for row, n in enumerate(durations):
            assert (got[row, :n] - expected[row, :n]).abs().max() <= SAMPLE_TOL


def test_calls_that_compile_are_logged(caplog):
    """A call during which torch.compile builds a graph says so (under load that is a stall of seconds); the
    next call of the same shape compiles nothing and logs nothing."""
    import logging
    import threading

    from f5_triton import solvers

    solver = solvers.GraphedSolver(torch.compile(lambda x, cond, text_embed, time, mask: x * 0.5 + cond),
                                   (64,), 3, pool=None, lock=threading.Lock(), max_rows=1)
    x = torch.randn(2, 40, 100)
    t = torch.linspace(0, 1, 4)
    with caplog.at_level(logging.INFO, logger="f5_triton.solvers"):
        solver(x, x, x, None, t)  # 2 rows > max_rows: the compiled function, no graph
        first = [r.getMessage() for r in caplog.records]
        caplog.clear()
        solver(x, x, x, None, t)
    assert any("dit_step: 2 rows x 40 frames: torch.compile built" in m for m in first), first
    assert not [r for r in caplog.records if "torch.compile built" in r.getMessage()]


def test_cover_shapes_leaves_no_graph_to_capture_in_service(dit, monkeypatch):
    """After `cover_shapes` (the server's warm-up), batches of any mix of lengths up to the frame limit and up to
    the graphed row count replay existing graphs: no capture while users wait. Larger batches run packed."""
    from f5_triton import solvers

    captured = []

    class Replay:  # what a captured graph does, without CUDA
        def __init__(self, forward, example, pool):
            self.forward = forward
            captured.append(tuple(t.shape for t in example))

        def replay(self, inputs):
            return self.forward(*inputs)

    monkeypatch.setattr(solvers, "CapturedGraph", Replay)
    engine = TorchEngine(DiTStep(dit), DIT_STEP)
    engine.solver = solvers.GraphedSolver(engine._forward, (64, 128, 192), 3, pool=None,
                                          lock=__import__("threading").Lock(), max_rows=2)
    runner = DiTRunner(dit, engine)
    made = runner.cover_shapes(max_requests=2, max_frames=150, nfe_steps=7)
    # rows 2 (one request with guidance; 4 > max_rows), buckets 64..192 (the one holding 150 frames), segments of
    # 3 steps and the remainder of 1
    assert made == len(captured) == 3 * 2
    assert set(engine.solver.graphs) == {(2, bucket, steps, True) for bucket in (64, 128, 192) for steps in (3, 1)}
    assert runner.cover_shapes(max_requests=2, max_frames=150, nfe_steps=7) == 0  # nothing left to capture
    for durations in [(150,), (63,), (101,), (150, 41), (120, 90)]:  # the last two: 4 rows > 2, packed
        got = sample_case(runner, durations, 2.0, 7)
        expected = sample_case(dit, durations, 2.0, 7)
        for row, n in enumerate(durations):
            assert (got[row, :n] - expected[row, :n]).abs().max() <= 1e-4
    assert len(captured) == 6  # no capture in service


# -- packed batches replayed as CUDA graphs (graph_max_tokens) --------------------------------------------------

PACKED_CASES = [  # (durations, cfg, steps): 3 and 4 requests (packed: more rows than max_rows), ragged, guided or not
    ((100, 80, 61), 2.0, 7), ((90, 33, 120, 7), 2.0, 7), ((70, 50, 44), 0.0, 8), ((200, 190, 210, 170), 2.0, 4)]


def _tensor_only_attention(q, k, v, packing, kernel="per_sequence"):
    """Attention within sequences from the packing's tensors alone, as the GPU's variable-length kernels work: a
    graph replays its captured layout's host values (`lengths`) with the new batch's tensors."""
    same = packing.sequence_ids[:, None] == packing.sequence_ids[None, :]
    out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                                           attn_mask=same)
    return out[0].transpose(0, 1)


def test_packed_graphs_replay_any_small_batch_exactly(dit, monkeypatch):
    """The packed graphs' own logic on the CPU (the CUDA capture replaced by a plain call of what it captured,
    attention by one that reads only tensors, as the GPU kernels do): tokens rounded up to a bucket, sequences
    filled to a fixed count, each request's result that of the request alone; the warm-up captures every bucket up
    to `max_tokens`, and then batches of any lengths replay those graphs, capturing nothing."""
    from f5_triton import solvers
    from f5_triton.model import dit as dit_module

    captured = []

    class Replay:  # what a captured graph does, without CUDA
        def __init__(self, forward, example, pool):
            self.forward = forward
            captured.append(tuple(t.shape for t in example[:3]))

        def replay(self, inputs):
            return self.forward(*inputs)

    assert not DiTStep(dit).packing_is_data  # the CPU's packed attention loops over `lengths`: the engine graphs none
    monkeypatch.setattr(solvers, "CapturedGraph", Replay)
    monkeypatch.setattr(dit_module, "packed_attention", _tensor_only_attention)
    engine = TorchEngine(DiTStep(dit), DIT_STEP)
    solver = engine.solver = solvers.GraphedSolver(engine._forward, (64, 128), 3, pool=None,
                                                   lock=__import__("threading").Lock(), max_rows=2,
                                                   max_tokens=2048)
    runner = DiTRunner(dit, engine)
    # packed buckets 2048 and 1024 (largest first), 3 steps a replay (about one request's graph of work) and the
    # remainder 1 of 7 steps
    assert solver.keys_to_cover(2, 128, 7)[-4:] == [("packed", 2048, 1, True), ("packed", 2048, 3, True),
                                                    ("packed", 1024, 1, True), ("packed", 1024, 3, True)]
    assert [solver.packed_steps(b) for b in (1024, 2048, 3072, 8192)] == [3, 3, 1, 1]
    made = runner.cover_shapes(max_requests=1, max_frames=128, nfe_steps=7)
    assert ("packed", 1024, 3, True) in solver.graphs and made == len(captured)
    assert ((512, 100), (1024, 100), (1024, 32)) in captured  # x: one branch's tokens; cond, text_embed: both
    for durations, cfg, steps in PACKED_CASES:
        before = len(captured)
        seen = []
        got = sample_case(runner, durations, cfg, steps, on_step=seen.append)
        expected = sample_case(dit, durations, cfg, steps)
        tokens = sum(durations) * (2 if cfg else 1)
        if tokens + 2 * 16 <= 2048:  # graphed: a replay per 3 steps; the guided ones were captured by the warm-up
            assert seen == list(range(0, steps, 3)), (durations, seen)
            assert len(captured) == before + (0 if cfg else 2)  # unguided: segments of 3 and of 2 steps
        else:  # 1540 tokens + fillers > 2048: the packed step without a graph
            assert seen == list(range(steps))
        for row, n in enumerate(durations):
            assert (got[row, :n] - expected[row, :n]).abs().max() <= 1e-4, (durations, cfg, steps)
    assert {("packed", 1024, 3, False), ("packed", 1024, 2, False)} <= set(solver.graphs)  # unguided: when met
    # a stream scheduler's segment: a replay's steps where a graph takes the batch, else one step
    from f5_triton.sampler import Solving, prepare

    inputs = prepare(runner, torch.randn(3, 40, 100), torch.randint(0, 256, (3, 30)), torch.tensor([100, 80, 61]),
                     steps=7, lens=torch.tensor([40, 40, 40]))
    assert Solving(runner, inputs).segment == 3
    inputs = prepare(runner, torch.randn(3, 40, 100), torch.randint(0, 256, (3, 30)), torch.tensor([500, 500, 500]),
                     steps=7, lens=torch.tensor([40, 40, 40]))
    assert Solving(runner, inputs).segment == 1


def test_filled_packing_changes_no_sequence(dit):
    """`packing.filled`: filler sequences (at least a token each) up to a fixed count and token total; the real
    sequences' step output is what it is without them."""
    from f5_triton.model.packing import filled

    assert filled((5, 3), 20, 4) == (5, 3, 11, 1)
    assert filled((5, 3), 8, 2) == (5, 3)
    with pytest.raises(ValueError, match="cannot fill"):
        filled((5, 3), 9, 2)  # a token over but no sequence to hold it
    with pytest.raises(ValueError, match="cannot fill"):
        filled((5, 3), 9, 4)  # two fillers need two tokens
    lengths = (37, 80, 5)
    layout = filled(lengths, 160, 6)
    torch.manual_seed(2)
    x, cond = torch.randn(160, 100), torch.randn(160, 100)
    embed = torch.randn(160, dit.config.text_dim)
    time = torch.rand(6)
    with torch.no_grad():
        alone = dit.step(x[:122], cond[:122], embed[:122], time[:3], Packing.of(lengths))
        with_fillers = dit.step(x, cond, embed, time, Packing.of(layout))
    assert (with_fillers[:122] - alone).abs().max() <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("compile_", [False, True])
def test_packed_graphs_match_the_packed_step_on_gpu(compile_):
    """On a GPU, packed batches replayed as CUDA graphs give each request what the packed step without graphs gives
    (fp16, the variable-length kernel `optimize_for` picks), and nothing is captured after the warm-up."""
    from f5_triton.checkpoints import random_dit
    from f5_triton.config import ARCHITECTURES

    config = ARCHITECTURES["tiny"].replace(heads=2, dim_head=64, dim=128)
    model = random_dit(config, seed=5).optimize_for("cuda", torch.float16)
    assert model.kernels.packed in ("fa4", "varlen")
    settings = dict(device="cuda", cuda_graphs=True, compile=compile_, frame_buckets=(64, 128), graph_steps=3,
                    graph_max_rows=2)
    graphed = make_dit_runner(model, EngineConfig(**settings, graph_max_tokens=2048))
    plain = make_dit_runner(model, EngineConfig(**settings))
    made = graphed.cover_shapes(max_requests=1, max_frames=128, nfe_steps=8)
    assert made == len(graphed.solver.graphs) and ("packed", 2048, 3, True) in graphed.solver.graphs
    for durations, cfg, steps in [((100, 80, 61), 2.0, 8), ((90, 33, 120, 7), 2.0, 8), ((300, 290), 2.0, 8)]:
        got = sample_case(graphed, durations, cfg, steps).float()
        expected = sample_case(plain, durations, cfg, steps).float()
        for row, n in enumerate(durations):
            assert (got[row, :n] - expected[row, :n]).abs().max() <= 2e-2 * expected[row, :n].abs().max()
    assert len(graphed.solver.graphs) == made
