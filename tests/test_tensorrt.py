"""TensorRT plans built by a real TensorRT builder: strongly typed, precision from the ONNX graph.

The test setup installs TensorRT-RTX (`pip install '.[tensorrt-rtx]'`), whose builder needs no GPU,
so the tiny DiT-step and vocoder plans are built here from the project's own ONNX export, fp16 and
fp32, through scripts/build_engines.py and through `bash run.sh 1 3` (whose export both use). What the
builder reports without a GPU is checked against the ONNX files (read with `onnx`) and the profile that
was asked for. Running a plan needs a GPU that the installed flavour supports: that test skips elsewhere.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

from f5_triton.engines import DIT_STEP, NETWORKS, VOCODER, DiTStep, VocoderNetwork
from f5_triton.engines.base import EngineUnavailable
from f5_triton.engines.networks import output_valid_mask, random_inputs
from f5_triton.engines.tensorrt_engine import (
    FLAVOUR_ENV,
    describe,
    flavour_of,
    import_tensorrt,
    tensorrt_available,
    unsupported_gpu,
)
from f5_triton.export.tensorrt_build import (
    BUILD_INFO_FILE,
    PRECISION_FLAGS,
    BuildOptions,
    ShapeRange,
    batch_range,
    profile_shapes,
)

REPO = Path(__file__).resolve().parents[1]
# The profile the plans here are built with: requests 1/2/2, frames 1/64/128 (small: the builder's memory).
PROFILE_ARGS = ["--opt-requests", "2", "--max-requests", "2", "--opt-frames", "64", "--max-frames", "128",
                "--workspace-gib", "1"]
ONNX_TYPES = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BOOL: "BOOL",
              onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32"}


def script_env(**extra: str) -> dict[str, str]:
    """This checkout's package first; no TensorRT flavour forced unless asked."""
    env = {k: v for k, v in os.environ.items() if k != FLAVOUR_ENV}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def run_script(name: str, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=script_env(**env))


@pytest.fixture(scope="module")
def trt():
    """The TensorRT module the builds use; the test setup installs tensorrt-rtx on x86-64."""
    try:
        return import_tensorrt()
    except EngineUnavailable as exc:
        if platform.machine() == "x86_64":
            pytest.fail(f"no TensorRT builder: pip install '.[tensorrt-rtx]' (scripts/setup_env.sh does). {exc}")
        pytest.skip(f"no TensorRT for {platform.machine()} here (tensorrt-rtx wheels are x86-64 only): {exc}")


@pytest.fixture(scope="module")
def run_sh_stages_1_to_3(trt, tiny_ckpt, tmp_path_factory):
    """`bash run.sh 1 3 --random-weights --backend trt` on the tiny checkpoint: its fp16 export (which writes
    the fp32 files too) is also what scripts/build_engines.py builds from below. (work folder, env, result)"""
    from test_run_sh import run, run_sh_env

    if flavour_of(trt) != "tensorrt-rtx" and not torch.cuda.is_available():
        pytest.skip(f"{describe(trt)} builds on a GPU only")
    work = tmp_path_factory.mktemp("run_sh_trt")
    env = run_sh_env(work, MODEL_DIR=str(tiny_ckpt), MAX_FRAMES="128", MAX_BATCH_SIZE="2",
                     TRT_WORKSPACE_GIB="1", PYTHONPATH=script_env()["PYTHONPATH"], OMP_NUM_THREADS="1")
    return work, env, run(["1", "3", "--random-weights", "--backend", "trt"], env)


@pytest.fixture(scope="module")
def onnx_files(run_sh_stages_1_to_3) -> Path:
    """The tiny checkpoint through the documented export (run.sh stage 1-2's f5-triton build): NAME.onnx and
    NAME.fp16.onnx."""
    work, _, result = run_sh_stages_1_to_3
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    return work / "build" / "onnx" / "random-tiny"


@pytest.fixture(scope="module")
def plans(trt, onnx_files, tmp_path_factory) -> dict[str, Path]:
    """scripts/build_engines.py run twice: fp16 plans from the fp16 files, fp32 plans from the fp32 files."""
    folders = {}
    for precision, suffix in (("fp16", [".fp16"]), ("fp32", [])):
        out = tmp_path_factory.mktemp(f"plans_{precision}")
        proc = run_script("build_engines.py", "--onnx-dir", str(onnx_files), "--output-dir", str(out),
                          *(["--onnx-suffix", *suffix] if suffix else []), *PROFILE_ARGS)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
        assert describe(trt) in proc.stdout
        folders[precision] = out
    return folders


def build_info(folder: Path) -> dict:
    return json.loads((folder / BUILD_INFO_FILE).read_text())


# ---------------------------------------------------------------------------------------------
# builds (no GPU needed with TensorRT-RTX)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_build_engines_writes_both_plans(plans, precision):
    for spec in (DIT_STEP, VOCODER):
        plan = plans[precision] / spec.plan_file
        assert plan.is_file() and plan.stat().st_size > 100_000, plan
    assert set(build_info(plans[precision])) == {"dit_step", "vocoder"}


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_builder_reports_the_onnx_graphs_inputs_outputs_and_dynamic_axes(plans, onnx_files, precision):
    info = build_info(plans[precision])
    for spec in (DIT_STEP, VOCODER):
        graph = onnx.load(str(onnx_files / f"{spec.name}{'.fp16' if precision == 'fp16' else ''}.onnx")).graph
        for reported, declared in ((info[spec.name]["inputs"], graph.input),
                                   (info[spec.name]["outputs"], graph.output)):
            expected = [{"name": t.name, "dtype": ONNX_TYPES[t.type.tensor_type.elem_type],
                         "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in t.type.tensor_type.shape.dim]}
                        for t in declared]
            assert reported == expected
        # the fp16 export keeps fp32 (and bool/int64) inputs and outputs
        assert [t["dtype"] for t in info[spec.name]["inputs"]] == (
            ["FLOAT"] * 4 + ["BOOL"] if spec is DIT_STEP else ["FLOAT", "INT64"])
        dynamic = {t["name"]: [axis for axis, size in enumerate(t["shape"]) if size == -1]
                   for t in info[spec.name]["inputs"]}
        assert dynamic == {t.name: list(t.dynamic_axes()) for t in spec.inputs}


def test_builder_reports_the_profile_that_was_set(plans):
    """Requests 1/2/2 and frames 1/64/128: the DiT's batch is two rows per request (min one), the vocoder's one."""
    info = build_info(plans["fp16"])
    dit, voc = info["dit_step"]["profile"], info["vocoder"]["profile"]
    assert dit["x"] == dit["cond"] == [[1, 1, 100], [4, 64, 100], [4, 128, 100]]
    assert dit["text_embed"] == [[1, 1, 32], [4, 64, 32], [4, 128, 32]]  # tiny text_dim
    assert dit["time"] == [[1], [4], [4]]
    assert dit["mask"] == [[1, 1], [4, 64], [4, 128]]
    assert voc["mel"] == [[1, 100, 1], [2, 100, 64], [2, 100, 128]]
    assert voc["lengths"] == [[1], [2], [2]]


def test_strongly_typed_builds_set_no_precision_flags(trt, plans):
    """The TensorRT-11 way: a STRONGLY_TYPED network, no FP16/INT8/... or precision-constraint flag; the
    fp16 plans compute in FP16 because their ONNX graph does, the fp32 plans do not."""
    if flavour_of(trt) == "tensorrt-rtx" or int(trt.__version__.split(".")[0]) >= 11:
        assert not hasattr(trt.BuilderFlag, "FP16")  # as in TensorRT 11: the build cannot depend on it
    for precision in ("fp16", "fp32"):
        for name, report in build_info(plans[precision]).items():
            assert report["strongly_typed"] is True
            assert report["flavour"] == flavour_of(trt) and report["tensorrt"] == describe(trt)
            assert not set(report["builder_flags"]) & set(PRECISION_FLAGS), report["builder_flags"]
            if precision == "fp16":
                assert 0 < report["half_layers"] < report["layers"], (name, report["half_layers"])
            else:
                assert report["half_layers"] == 0, name


def test_profile_doubles_dit_batch_for_cfg_and_reads_static_dims():
    options = BuildOptions(requests=ShapeRange(1, 2, 4), frames=ShapeRange(16, 1024, 4096))
    assert batch_range(DIT_STEP, options.requests) == ShapeRange(1, 4, 8)
    assert batch_range(VOCODER, options.requests) == ShapeRange(1, 2, 4)
    static = {"x": (-1, -1, 100), "cond": (-1, -1, 100), "text_embed": (-1, -1, 512), "time": (-1,), "mask": (-1, -1)}
    shapes = profile_shapes(DIT_STEP, static, options)
    assert shapes["x"] == ((1, 16, 100), (4, 1024, 100), (8, 4096, 100))
    assert shapes["text_embed"][2] == (8, 4096, 512)
    assert shapes["time"] == ((1,), (4,), (8,))
    voc = profile_shapes(VOCODER, {"mel": (-1, 100, -1), "lengths": (-1,)}, options)
    assert voc["mel"] == ((1, 100, 16), (2, 100, 1024), (4, 100, 4096))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeRange(4, 2, 8)


# ---------------------------------------------------------------------------------------------
# choosing the flavour


@pytest.mark.skipif(tensorrt_available("tensorrt"), reason="TensorRT proper is installed: its absence cannot show")
def test_forcing_a_missing_flavour_says_what_was_found_and_what_to_install(trt, onnx_files, tmp_path):
    proc = run_script("build_engines.py", "--onnx-dir", str(onnx_files), "--output-dir", str(tmp_path / "plans"),
                      "--tensorrt", "tensorrt", timeout=120)
    assert proc.returncode == 3
    assert "`tensorrt` is not installed" in proc.stderr
    assert "pip install tensorrt" in proc.stderr and "nvcr.io/nvidia" in proc.stderr
    assert f"{describe(trt)} is installed (--tensorrt {flavour_of(trt)}" in proc.stderr
    assert not (tmp_path / "plans").exists()


@pytest.mark.skipif(tensorrt_available("tensorrt"), reason="TensorRT proper is installed: it would be chosen")
def test_placeholder_tensorrt_package_is_passed_over_for_tensorrt_rtx(tmp_path):
    """A `tensorrt` that imports without the TensorRT API (a stub package) is not taken for TensorRT."""
    if not tensorrt_available("tensorrt-rtx"):
        pytest.fail("tensorrt-rtx is not installed: pip install '.[tensorrt-rtx]'")
    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "tensorrt" / "__init__.py").write_text('__version__ = "10.13.0"\n')
    code = ("from f5_triton.engines.tensorrt_engine import describe, import_tensorrt\n"
            "print(describe(import_tensorrt()))\n")
    env = script_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    auto = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert auto.returncode == 0, auto.stderr
    assert auto.stdout.startswith("TensorRT-RTX ")
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**env, FLAVOUR_ENV: "tensorrt"})
    assert forced.returncode != 0
    assert "placeholder package without the TensorRT API" in forced.stderr and str(tmp_path) in forced.stderr


def test_unknown_flavour_is_refused():
    with pytest.raises(EngineUnavailable, match="unknown TensorRT flavour 'tensorrt-12'.*auto, tensorrt or"):
        import_tensorrt("tensorrt-12")


def test_tensorrt_rtx_refuses_hopper_and_names_tensorrt(trt):
    if flavour_of(trt) != "tensorrt-rtx":
        pytest.skip(f"{describe(trt)} runs on Hopper")
    assert "install TensorRT" in unsupported_gpu(trt, (9, 0)) and "Hopper" in unsupported_gpu(trt, (9, 0))
    assert unsupported_gpu(trt, (8, 9)) is None and unsupported_gpu(trt, (12, 0)) is None


def test_engine_key_names_the_flavour_and_version(trt):
    proc = run_script("engine_key.py", timeout=120)
    if flavour_of(trt) == "tensorrt-rtx":  # portable plans: no GPU in the key, none needed
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"portable-trtrtx{trt.__version__}"
    elif torch.cuda.is_available():
        assert proc.stdout.strip().endswith(f"-trt{trt.__version__}")
    else:
        assert proc.returncode == 3 and "no CUDA GPU" in proc.stderr


# ---------------------------------------------------------------------------------------------
# run.sh stages 1-2


def test_run_sh_stages_1_to_3_build_fp16_plans_and_their_repository(run_sh_stages_1_to_3, trt):
    from conftest import rendered_settings
    from test_repository import parse
    from test_run_sh import run

    work, env, result = run_sh_stages_1_to_3
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    key = run_script("engine_key.py", timeout=120).stdout.strip()
    engines = work / "build" / "engines" / "random-tiny" / key
    for spec in NETWORKS.values():
        assert (engines / spec.plan_file).is_file()
        report = json.loads((engines / f"build_info.{spec.name}.json").read_text())[spec.name]
        assert report["half_layers"] > 0 and report["strongly_typed"]  # from the fp16 export
        assert (work / "build" / "onnx" / "random-tiny" / f"{spec.name}.fp16.onnx").is_file()
    assert report["profile"]["mel"][2] == [8, 100, 128]  # the repository's vocoder batch, MAX_FRAMES

    repo = work / "build" / "model_repo"
    flow = rendered_settings(repo, "flow_matching").dit_engine
    vocoder = parse(repo / "vocoder" / "config.pbtxt")
    assert flow["kind"] == "tensorrt" and flow["path"] == str(engines / "dit_step.plan")
    if flavour_of(trt) == "tensorrt-rtx":  # Triton's TensorRT backend cannot load it: a python model runs the plan
        assert vocoder.backend == "python"
        assert rendered_settings(repo, "vocoder").vocoder_engine == {
            "kind": "tensorrt", "path": str(engines / "vocoder.plan"), "fallback": True}
    else:
        assert vocoder.backend == "tensorrt" and (repo / "vocoder" / "1" / "model.plan").is_file()

    again = run(["1", "3", "--random-weights", "--backend", "trt"], env)
    assert again.returncode == 0 and again.stdout.count("is up to date") == 5, again.stdout


# ---------------------------------------------------------------------------------------------
# running plans (GPU)


@pytest.mark.gpu
def test_plans_run_and_match_torch(request, dit, decoder):
    """The fp16 plans against the torch fp32 modules; inputs outside the profile are refused."""
    from f5_triton.engines import EngineConfig, ShapeOutOfRange, load_engine
    from f5_triton.engines.tensorrt_engine import RTX_COMPUTE_CAPABILITIES

    capability = torch.cuda.get_device_capability()
    if not tensorrt_available() and capability not in RTX_COMPUTE_CAPABILITIES:
        # the GPU lane's machine: no TensorRT (its libraries exceed what a call carries), and the flavour the
        # setup installs could not run here anyway
        pytest.skip(f"no TensorRT here, and TensorRT-RTX does not run on compute capability "
                    f"{capability[0]}.{capability[1]}{' (Hopper)' if capability[0] == 9 else ''}")
    trt, plans = request.getfixturevalue("trt"), request.getfixturevalue("plans")
    problem = unsupported_gpu(trt, capability)
    if problem:
        pytest.skip(problem)
    for module, spec, tolerance in ((DiTStep(dit), DIT_STEP, 2e-2), (VocoderNetwork(decoder), VOCODER, 1e-3)):
        engine = load_engine(EngineConfig(kind="tensorrt", path=plans["fp16"] / spec.plan_file, device="cuda",
                                          fallback=False), module)
        lengths = (100, 37)
        inputs = random_inputs(spec, lengths, module.static_sizes)
        with torch.inference_mode():
            expected = module(*inputs)
        got = engine(*[t.cuda() for t in inputs]).cpu()
        keep = output_valid_mask(spec, expected, lengths).expand_as(expected)
        assert (got - expected).abs()[keep].max() <= tolerance
        with pytest.raises(ShapeOutOfRange, match="optimization profile"):
            engine(*random_inputs(spec, (300,), module.static_sizes))
