"""Rendering the model repository for each target; configs parse as Triton ModelConfig protos."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from conftest import rendered_settings
from f5_triton.errors import InvalidInputError
from f5_triton.request import INPUTS
from f5_triton.serving import wire
from f5_triton.repository import STEP_MODELS, RepositoryOptions, render

REPO_ROOT = Path(__file__).resolve().parents[1]


def parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture
def plans(tmp_path):
    dit, vocoder = tmp_path / "dit_step.plan", tmp_path / "vocoder.plan"
    dit.write_bytes(b"not a real plan")
    vocoder.write_bytes(b"not a real plan")
    return dit, vocoder


@pytest.mark.parametrize("target", ["cpu", "gpu", "trt"])
def test_script_renders_every_target(tmp_path, tiny_ckpt, plans, target):
    out = tmp_path / "repo"
    args = [sys.executable, str(REPO_ROOT / "scripts" / "build_model_repo.py"), "--target", target,
            "--ckpt-dir", str(tiny_ckpt), "--output", str(out), "--nfe", "16", "--max-batch-size", "4",
            "--queue-delay-us", "1234"]
    if target == "trt":
        args += ["--dit-engine-path", str(plans[0]), "--vocoder-plan", str(plans[1])]
    if target == "cpu":
        args += ["--vocoder-in-flow"]  # not the cpu default: the flag reaches the repository
    subprocess.run(args, check=True, capture_output=True)
    configs = {name: parse(out / name / "config.pbtxt") for name in STEP_MODELS}
    ensemble = configs["f5_tts"]
    assert ensemble.platform == "ensemble"
    assert [i.name for i in ensemble.input] == [f.name for f in INPUTS]
    assert [o.name for o in ensemble.output] == ["waveform"]
    flow = configs["flow_matching"]
    assert flow.max_batch_size == 4
    assert flow.dynamic_batching.max_queue_delay_microseconds == 1234
    assert all(i.allow_ragged_batch for i in flow.input if -1 in i.dims)
    settings = rendered_settings(out, "flow_matching")
    assert Path(settings.weights.ckpt).is_file() and Path(settings.weights.vocab).is_file()
    assert settings.dit_engine["kind"] == ("tensorrt" if target == "trt" else "torch")
    assert rendered_settings(out, "preprocess").sampling.nfe_steps == 16
    fields = wire.MEL_FIELDS if target == "trt" else wire.WAVE_FIELDS  # cpu: --vocoder-in-flow, gpu: default
    assert [o.name for o in flow.output] == [f.name for f in fields]
    kind = model_config_pb2.ModelInstanceGroup.KIND_CPU if target == "cpu" else model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert flow.instance_group[0].kind == kind
    vocoder = configs["vocoder"]
    if target == "trt":
        assert vocoder.backend == "tensorrt" and (out / "vocoder" / "1" / "model.plan").is_file()
    else:
        assert vocoder.backend == "python" and (out / "vocoder" / "1" / "model.py").is_file()


def chunk_wiring(out: Path) -> dict[str, list[str]]:
    """What flow_matching sends postprocess, as each config of a rendered repository sees it."""
    configs = {name: parse(out / name / "config.pbtxt") for name in ("f5_tts", "flow_matching", "postprocess")}
    flow_step, post_step = (next(s for s in configs["f5_tts"].ensemble_scheduling.step if s.model_name == name)
                            for name in ("flow_matching", "postprocess"))
    return {"flow outputs": [o.name for o in configs["flow_matching"].output],
            "flow output_map": sorted(f"{k}->{v}" for k, v in flow_step.output_map.items()),
            "postprocess input_map": sorted(f"{k}<-{v}" for k, v in post_step.input_map.items()
                                            if k not in ("ref_rms", "received_at")),
            "vocode": [rendered_settings(out, "flow_matching").placement.vocode],
            "postprocess optional": [i.name for i in configs["postprocess"].input if i.optional]}


@pytest.mark.parametrize("target, vocoder_in_flow, fields", [
    ("cpu", None, wire.MEL_FIELDS), ("gpu", None, wire.WAVE_FIELDS),
    ("cpu", True, wire.WAVE_FIELDS), ("gpu", False, wire.MEL_FIELDS)])
def test_vocoder_in_flow_wires_waves_or_mels(tmp_path, tiny_ckpt, target, vocoder_in_flow, fields):
    """Default: the vocoder runs in flow_matching's process on gpu, as its own model (BLS) on cpu."""
    out = render(RepositoryOptions(target=target, ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                                   vocoder=tiny_ckpt / "vocos", vocoder_in_flow=vocoder_in_flow), tmp_path / "repo")
    names = [f.name for f in fields]
    assert chunk_wiring(out) == {
        "flow outputs": names, "flow output_map": sorted(f"{n}->{n}" for n in names),
        "postprocess input_map": sorted(f"{n}<-{n}" for n in names),
        "vocode": [fields is wire.WAVE_FIELDS],
        "postprocess optional": ["mel", "mel_frames", "waves", "wave_samples", "received_at"]}
    settings = rendered_settings(out, "flow_matching")
    assert bool(settings.vocoder_engine) == (fields is wire.WAVE_FIELDS) and Path(settings.weights.vocoder).is_dir()
    assert (out / "vocoder" / "config.pbtxt").is_file()  # the vocoder model stays for direct clients


def test_trt_target_keeps_its_vocoder_plan_model(tiny_ckpt, plans):
    common = dict(target="trt", ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                  vocoder=tiny_ckpt / "vocos", dit_engine_path=plans[0], vocoder_plan=plans[1])
    assert RepositoryOptions(**common).vocoder_in_flow is False
    with pytest.raises(ValueError, match="cpu and gpu targets"):
        RepositoryOptions(**common, vocoder_in_flow=True)


def test_chunk_wire_round_trips_and_names_the_fields():
    mels = [np.random.rand(7, 100).astype(np.float32), np.random.rand(3, 100).astype(np.float32)]
    kind, chunks = wire.unpack_chunks(wire.pack_mels([torch.from_numpy(m) for m in mels]))
    assert kind == "mel" and all(np.array_equal(c, m.T) for c, m in zip(chunks, mels))
    waves = [np.random.rand(5).astype(np.float32), np.random.rand(9).astype(np.float32)]
    packed = wire.pack_waves(waves)
    assert packed["waves"].shape == (2, 9) and packed["wave_samples"].tolist() == [5, 9]
    kind, chunks = wire.unpack_chunks(packed)
    assert kind == "waves" and all(np.array_equal(c, w) for c, w in zip(chunks, waves))
    for arrays, message in [
        ({}, "mel/mel_frames/waves/wave_samples: send either mel + mel_frames or waves + wave_samples; got none"),
        ({**packed, "mel": np.zeros((1, 100, 4), np.float32)}, "got mel, waves, wave_samples"),
        ({"waves": packed["waves"]}, "got waves"),
        ({**packed, "wave_samples": np.array([5], np.int32)}, "wave_samples: has 1 values for waves of shape (2, 9)"),
        ({**packed, "wave_samples": np.array([5, 10], np.int32)}, "wave_samples: holds [5, 10]; each must lie in"),
    ]:
        with pytest.raises(InvalidInputError) as info:
            wire.unpack_chunks(arrays)
        assert message in str(info.value)


def test_gpus_place_instances(tmp_path, tiny_ckpt):
    out = render(RepositoryOptions(target="gpu", ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                                   vocoder=tiny_ckpt / "vocos", gpus=[0, 1], flow_instances_per_device=2),
                 tmp_path / "repo")
    groups = parse(out / "flow_matching" / "config.pbtxt").instance_group
    # one group per instance, told apart by their host-policy names (the watchdog replaces one alone)
    active = [(g.name, list(g.gpus), g.count, g.host_policy) for g in groups if not g.passive]
    assert active == [(f"flow_matching_gpu{d}_{s}", [d], 1, f"flow_matching_gpu{d}_{s}") for d in (0, 1) for s in (0, 1)]
    (standby,) = [g for g in groups if g.passive]  # loads nothing: the model stays valid while one is replaced
    assert standby.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU and standby.count == 1
    # model.py compiled at render: a stub writing __pycache__ would make Triton reload the whole model
    assert list((out / "flow_matching" / "1" / "__pycache__").glob("model.*.pyc"))


def test_trt_target_needs_engines(tiny_ckpt):
    with pytest.raises(ValueError, match="--vocoder-plan"):
        RepositoryOptions(target="trt", ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                          vocoder=tiny_ckpt / "vocos")


@pytest.mark.server
def test_trt_repository_passes_tritonserver_config_parsing(tmp_path, tiny_ckpt, plans):
    """The bundled server has no TensorRT backend: every model must load or fail only for that reason."""
    from f5_triton.supervisor.server import TritonServer, free_port

    repo = render(RepositoryOptions(target="trt", ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                                    vocoder=tiny_ckpt / "vocos", dit_engine_path=plans[0], vocoder_plan=plans[1],
                                    preprocess_instances=1, postprocess_instances=1,
                                    warmup=False),  # the torch fallback's warm-up on CPU: minutes under load
                  tmp_path / "repo")
    # the python models run on the CPU here: turn the GPU instance groups into CPU ones
    for name in ("flow_matching",):
        path = repo / name / "config.pbtxt"
        path.write_text(path.read_text().replace("kind: KIND_GPU gpus: [ 0 ]", "kind: KIND_CPU"))
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          extra_args=["--exit-on-error=false", "--strict-readiness=false"])
    with server:
        server.wait_ready(240)
        request = urllib.request.Request(f"{server.urls.http}/v2/repository/index", data=b"{}", method="POST",
                                         headers=server.admin_headers)
        index = {m["name"]: m for m in json.load(urllib.request.urlopen(request))}
        log = Path(server.log_path).read_text()
    for name in ("f5_tts", "preprocess", "flow_matching", "postprocess"):
        assert index[name]["state"] == "READY", index[name]
    assert index["vocoder"]["state"] == "UNAVAILABLE"
    assert "tensorrt" in index["vocoder"]["reason"].lower()
    assert "falling back" in log.lower() or "fallback" in log.lower()  # the DiT plan is not a plan: loud warning


@pytest.mark.parametrize("target, warmup, flow_requests, streaming_requests", [
    ("cpu", None, 0, 0), ("gpu", None, 8, 16), ("gpu", False, 0, 0), ("cpu", True, 4, 16)])
def test_warmup_is_on_for_gpus_and_sized_by_the_batch(tmp_path, tiny_ckpt, target, warmup, flow_requests,
                                                      streaming_requests):
    out = render(RepositoryOptions(target=target, ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                                   vocoder=tiny_ckpt / "vocos", warmup=warmup, nfe_steps=16), tmp_path / "repo")
    flow, streaming = (rendered_settings(out, name).warmup for name in ("flow_matching", "f5_tts_streaming"))
    assert (flow.requests, flow.nfe_steps) == (flow_requests, 16)
    assert streaming.requests == streaming_requests  # f5_tts_streaming batches max_streams


def test_stage_warm_up_runs_flow_matching_and_vocoder(tiny_ckpt):
    import dataclasses

    from f5_triton.config import ServingSettings, WarmupConfig, WeightsConfig
    from f5_triton.serving import factories

    settings = ServingSettings(weights=WeightsConfig(ckpt=str(tiny_ckpt / "model.safetensors"),
                                                     vocab=str(tiny_ckpt / "vocab.txt"), vocoder=str(tiny_ckpt / "vocos")),
                               warmup=WarmupConfig(nfe_steps=2))
    flow_matcher, vocoder = factories.load_flow_matcher(settings, "cpu"), factories.load_vocoder(settings, "cpu")
    decoded = []
    spy = lambda mels: decoded.append(len(mels)) or vocoder(mels)  # noqa: E731
    assert factories.warm_up(settings, flow_matcher, spy) is None and not decoded
    settings = dataclasses.replace(settings, warmup=WarmupConfig(requests=3, nfe_steps=2))
    assert factories.warm_up(settings, flow_matcher, spy) > 0 and decoded == [1 + 2 + 3 + 2]


@pytest.mark.parametrize("target, gpu_stage_threads", [("cpu", 0), ("gpu", 2)])
def test_torch_threads_are_capped_except_where_the_networks_run_on_the_cpu(tmp_path, tiny_ckpt, target,
                                                                            gpu_stage_threads):
    out = render(RepositoryOptions(target=target, ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                                   vocoder=tiny_ckpt / "vocos"), tmp_path / "repo")
    threads = {name: rendered_settings(out, name).placement.torch_threads
               for name in ("preprocess", "postprocess", "flow_matching", "vocoder", "f5_tts_streaming")}
    assert threads == {"preprocess": 2, "postprocess": 2, "flow_matching": gpu_stage_threads,
                       "vocoder": gpu_stage_threads, "f5_tts_streaming": gpu_stage_threads}


def test_cuda_graph_options_reach_the_flow_matching_engine(tmp_path, tiny_ckpt):
    from f5_triton.serving import factories

    out = tmp_path / "repo"
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "build_model_repo.py"), "--target", "gpu",
                    "--ckpt-dir", str(tiny_ckpt), "--output", str(out), "--graph-steps", "4", "--graph-max-rows", "16",
                    "--no-warmup"], check=True, capture_output=True)
    settings = rendered_settings(out, "flow_matching")
    config = factories.engine_config(settings, "dit", "cuda:0")
    assert (config.graph_steps, config.graph_max_rows, config.cuda_graphs, config.compile) == (4, 16, True, True)
    assert settings.warmup.requests == 0


def test_serving_document_sets_limits_and_sampling_defaults():
    """Limits and sampling defaults come from the config, overridden only by the document's fields that name them;
    a value of the wrong type or a field that does not exist is refused, naming it."""
    from f5_triton.config import DEFAULT_LIMITS, DEFAULT_SAMPLING, load_serving_document, parse_bool
    from f5_triton.serving import factories

    settings = load_serving_document(json.dumps({"limits": {"max_text_bytes": 100},
                                                 "sampling": {"nfe_steps": 8, "sway_sampling_coef": -0.5}}))
    limits, sampling = settings.limits, settings.sampling
    assert limits.max_text_bytes == 100 and limits.max_mel_frames == DEFAULT_LIMITS.max_mel_frames
    for document, message in [({"sampling": {"nfe_steps": "8"}}, "sampling.nfe_steps must be int, got '8'"),
                              ({"sampling": {"nfe_steps": 8.0}}, "sampling.nfe_steps must be int, got 8.0"),
                              ({"pacing": {"enabled": "true"}}, "pacing.enabled must be bool"),
                              ({"scheduler": {"granularity": "step"}}, "scheduler.granularity must be one of"),
                              ({"limits": {"max_txt_bytes": 1}}, r"limits has unknown fields \['max_txt_bytes'\]"),
                              ({"sampler": {}}, r"unknown fields \['sampler'\]")]:
        with pytest.raises(ValueError, match=message):
            load_serving_document(json.dumps(document))
    assert (sampling.nfe_steps, sampling.sway_sampling_coef, sampling.cfg_strength) == (
        8, -0.5, DEFAULT_SAMPLING.cfg_strength)
    fields = {"reference_wav": np.full(24_000, 0.1, np.float32), "reference_text": "a b", "target_text": "c d",
              "nfe_steps": None, "cfg_strength": None, "speed": np.float32(1.5)}
    request = factories.request_from_inputs(fields, sampling, limits)
    assert (request.nfe_steps, request.sway_sampling_coef, request.cfg_strength, request.speed) == (8, -0.5, 2.0, 1.5)
    with pytest.raises(InvalidInputError, match="target_text"):
        factories.request_from_inputs({**fields, "target_text": "x" * 101}, sampling, limits)
    assert parse_bool(None, True) and not parse_bool(" OFF ") and parse_bool("Yes")
    with pytest.raises(ValueError, match="not a boolean"):
        parse_bool("2")
