"""f5_triton.build, on real files: stamps and locks, the checkpoint stage, the repository stage, the ONNX step,
and `f5-triton build` as run.sh calls it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import rendered_settings
from f5_triton.build import (
    BuildError,
    ModelFiles,
    RepositorySettings,
    Stamp,
    choose_backend,
    engine_batches,
    export_onnx,
    locked,
    make,
    plan_flavour,
    prepare_checkpoint,
    render_repository,
)
from f5_triton.repository import TEMPLATES, RepositoryOptions


def touch_later(path: Path, seconds: float = 2.0) -> None:
    """Give ``path`` a modification time ``seconds`` from now (newer than anything written before)."""
    later = time.time() + seconds
    os.utime(path, (later, later))


def f5(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "f5_triton.cli", *args], capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------
# stamps, locks, make


def test_stamp_records_settings_and_sees_changed_inputs(tmp_path):
    out, source, folder = tmp_path / "out.bin", tmp_path / "in.txt", tmp_path / "inputs"
    source.write_text("x")
    folder.mkdir()
    (folder / "a").write_text("a")
    stamp = Stamp(out, "--max-frames 4096")
    assert not stamp.up_to_date([source, folder])  # no output yet
    out.write_text("made")
    assert not stamp.up_to_date([source, folder])  # no stamp yet
    stamp.write()
    os.utime(stamp.path, (time.time() + 1, time.time() + 1))
    assert stamp.path == tmp_path / "out.bin.stamp" and stamp.path.read_text() == "--max-frames 4096"
    assert stamp.up_to_date([source, folder])
    assert not Stamp(out, "--max-frames 2048").up_to_date([source, folder])  # other settings
    assert not stamp.up_to_date([source, tmp_path / "missing"])  # a missing input
    touch_later(source, 5)
    assert not stamp.up_to_date([source])  # a newer input file
    assert stamp.up_to_date([folder])
    (folder / "b").write_text("b")
    touch_later(folder / "b", 5)
    assert not stamp.up_to_date([folder])  # something newer inside an input folder
    stamp.clear()
    assert not stamp.path.exists()


def test_lock_serializes_builders_of_one_folder(tmp_path):
    events: list[str] = []
    first_holds = threading.Event()

    def first():
        with locked(tmp_path / "engines"):
            events.append("first in")
            first_holds.set()
            time.sleep(0.5)
            events.append("first out")

    def second():
        first_holds.wait()
        with locked(tmp_path / "engines"):  # a second open file: flock makes it wait, as another process would
            events.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert events == ["first in", "first out", "second in"]
    assert (tmp_path / "engines" / ".lock").exists()


def test_make_builds_once_and_leaves_nothing_behind_a_failure(tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("x")
    os.utime(source, (time.time() - 10, time.time() - 10))
    out = tmp_path / "out" / "result.txt"
    calls = []

    def produce(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "result.txt").write_text("done")
        os.replace(tmp / "result.txt", out)

    logs: list[str] = []
    assert make(Stamp(out, "a"), [source], out.parent, produce, logs.append)
    assert not make(Stamp(out, "a"), [source], out.parent, produce, logs.append)
    assert len(calls) == 1 and logs == [f"wrote {out}", f"{out} is up to date"]
    assert not calls[0].exists()  # the staging folder is gone

    def fail(tmp: Path) -> None:
        (tmp / "half").write_text("")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError, match="builder crashed"):
        make(Stamp(out, "b"), [source], out.parent, fail, logs.append)
    assert not Stamp(out, "b").path.exists() and not Stamp(out, "a").path.exists()  # made again next time
    assert sorted(p.name for p in out.parent.iterdir()) == [".lock", "result.txt"]


# ---------------------------------------------------------------------------------------------
# stage 0


def test_random_checkpoint_is_written_once_then_found(tmp_path):
    model_dir = tmp_path / "ckpts" / "random-tiny"
    logs: list[str] = []
    files = prepare_checkpoint("F5TTS_v1_Base", tmp_path / "ckpts", model_dir, random_weights=True, log=logs.append)
    assert files == ModelFiles.find(model_dir)
    assert files.ckpt.parent == model_dir and files.vocab == model_dir / "vocab.txt" and files.vocoder.is_dir()
    assert "NOT speech" in logs[0]
    prepare_checkpoint("F5TTS_v1_Base", tmp_path / "ckpts", model_dir, random_weights=True, log=logs.append)
    assert logs[1] == f"checkpoint found in {model_dir}"


def test_missing_checkpoint_says_what_to_do(tmp_path):
    assert ModelFiles.find(tmp_path) is None
    with pytest.raises(BuildError, match="no checkpoint in .*run stage 0"):
        ModelFiles.require(tmp_path)
    with pytest.raises(BuildError, match="MODEL_DIR=.* holds no checkpoint"):
        prepare_checkpoint("F5TTS_v1_Base", tmp_path / "ckpts", tmp_path / "elsewhere")


def test_vocos_beside_the_checkpoint_is_found(tmp_path, tiny_ckpt):
    model_dir = tmp_path / "F5TTS_v1_Base"
    model_dir.mkdir()
    for name in ("model.safetensors", "vocab.txt"):
        shutil.copy(tiny_ckpt / name, model_dir)
    assert ModelFiles.find(model_dir) is None  # no Vocos anywhere
    shutil.copytree(tiny_ckpt / "vocos", tmp_path / "vocos-mel-24khz")  # the hub layout: beside the model folder
    assert ModelFiles.find(model_dir).vocoder == (tmp_path / "vocos-mel-24khz").resolve()


# ---------------------------------------------------------------------------------------------
# engines and the repository


def test_engine_settings(tmp_path):
    default = RepositoryOptions("gpu", Path(), Path(), Path())
    assert engine_batches() == {"dit_step": default.max_batch_size, "vocoder": default.vocoder_max_batch_size}
    assert engine_batches(3)["dit_step"] == 3
    assert plan_flavour(tmp_path) == "tensorrt"  # no build info: a plan of the default flavour
    (tmp_path / "build_info.vocoder.json").write_text(json.dumps({"vocoder": {"flavour": "tensorrt-rtx"}}))
    assert plan_flavour(tmp_path) == "tensorrt-rtx"
    assert choose_backend("torch", "cpu") == ("torch", "cpu")
    assert choose_backend("trt", "gpu") == ("trt", "gpu")
    for backend, target, message in (("trt", "cpu", "runs on a GPU"), ("tpu", "", "--backend"),
                                     ("torch", "npu", "--target")):
        with pytest.raises(BuildError, match=message):
            choose_backend(backend, target)


def test_repository_arguments_per_backend(tmp_path):
    model_dir, engines = tmp_path / "model", tmp_path / "engines"
    engines.mkdir()
    args, plans = RepositorySettings("torch", "cpu", nfe=4, extra=("--no-streaming",)).arguments(model_dir)
    assert args == ["--ckpt-dir", str(model_dir), "--target", "cpu", "--nfe", "4", "--no-streaming"] and plans == []
    args, plans = RepositorySettings("trt", "gpu", arch="F5TTS_v1_Base", engines=engines,
                                     max_batch_size=2).arguments(model_dir)
    assert args == ["--ckpt-dir", str(model_dir), "--arch", "F5TTS_v1_Base", "--target", "trt", "--max-batch-size",
                    "2", "--dit-engine-path", str(engines / "dit_step.plan"), "--vocoder-plan",
                    str(engines / "vocoder.plan")]
    assert plans == [engines / "dit_step.plan", engines / "vocoder.plan"]
    (engines / "build_info.vocoder.json").write_text(json.dumps({"vocoder": {"flavour": "tensorrt-rtx"}}))
    args, _ = RepositorySettings("trt", "gpu", engines=engines).arguments(model_dir)
    assert args[args.index("--target") + 1] == "gpu" and args.count("tensorrt") == 2  # both in python models


def test_repository_is_rendered_when_stale(tmp_path, tiny_ckpt):
    model_dir = tmp_path / "random-tiny"
    shutil.copytree(tiny_ckpt, model_dir)
    output = tmp_path / "build" / "model_repo"
    logs: list[str] = []
    settings = RepositorySettings("torch", "cpu", nfe=4)
    render_repository(output, model_dir, settings, logs.append)
    assert (output / "flow_matching" / "config.pbtxt").is_file()
    # what run.sh's bash stamps held: repositories rendered before stay valid
    assert (output.parent / "model_repo.stamp").read_text() == f"--ckpt-dir {model_dir} --target cpu --nfe 4"
    render_repository(output, model_dir, settings, logs.append)
    assert logs == [f"rendering the model repository at {output}", f"{output} is up to date"]
    touch_later(model_dir / "model.safetensors")
    render_repository(output, model_dir, settings, logs.append)
    assert logs[-1].startswith("rendering")
    render_repository(output, model_dir, RepositorySettings("torch", "cpu", nfe=8), logs.append)
    assert logs[-1].startswith("rendering") and rendered_settings(output, "preprocess").sampling.nfe_steps == 8
    with pytest.raises(BuildError, match="holds the templates"):
        render_repository(TEMPLATES, model_dir, settings)


def test_onnx_export_step_is_reused(tmp_path, tiny_ckpt):
    pytest.importorskip("onnxruntime")
    files = ModelFiles.require(tiny_ckpt)
    onnx_dir = tmp_path / "onnx"
    logs: list[str] = []
    out = export_onnx("vocoder", files, onnx_dir, "fp32", log=logs.append)
    assert out == onnx_dir / "vocoder.onnx" and out.is_file()
    assert (onnx_dir / "export_info.vocoder.json").is_file() and Stamp(out, "export vocoder fp32").path.is_file()
    assert sorted(p.name for p in onnx_dir.iterdir() if p.name.startswith(".tmp")) == []
    logs.clear()
    export_onnx("vocoder", files, onnx_dir, "fp32", log=logs.append)
    assert logs == [f"{out} is up to date"]


# ---------------------------------------------------------------------------------------------
# the command line run.sh calls


def test_build_commands(tmp_path):
    ckpts = tmp_path / "ckpts"
    result = f5("build", "checkpoint", "--model", "F5TTS_v1_Base", "--ckpt-dir", str(ckpts), "--model-dir",
                str(ckpts / "random-tiny"), "--random-weights")
    assert result.returncode == 0 and "NOT speech" in result.stdout, result.stderr
    result = f5("build", "repository", "--output", str(tmp_path / "repo"), "--model-dir", str(ckpts / "random-tiny"),
                "--backend", "torch", "--target", "cpu", "--nfe", "4", "--repo-args=--no-streaming")
    assert result.returncode == 0 and "rendering" in result.stdout, result.stderr
    assert not (tmp_path / "repo" / "f5_tts_streaming").exists()  # REPO_ARGS reached the repository
    result = f5("build", "backend", "--backend", "torch", "--target", "cpu", "--model", "F5TTS_Small")
    assert result.returncode == 0 and result.stdout.split() == ["torch", "cpu"]
    result = f5("build", "backend", "--model", "F5TTS_Huge")
    assert result.returncode == 2 and "unknown model 'F5TTS_Huge'" in result.stderr
    result = f5("build", "engine-dir", "--engine-dir", str(tmp_path / "plans"))
    assert result.stdout.strip() == str(tmp_path / "plans")
