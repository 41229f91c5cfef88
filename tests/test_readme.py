"""The README's commands, parsed from README.md (the blocks marked `<!-- tested: NAME -->`) and run as
written, in order, from a folder laid out as a fresh clone: the quick start (run.sh serve with random
weights, both clients, streaming, synth, benchmark), the Python client snippet, the gateway (start,
voice upload, speech with curl) and its `openai` snippet.

Only ports change: Triton's through HTTP_PORT/GRPC_PORT/METRICS_PORT (which run.sh, the clients, the
gateway and benchmark.py read), and `localhost:<default port>` in curl lines and Python snippets, so
that the test never meets another server on the default ports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf

pytestmark = pytest.mark.server

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- tested: (?P<name>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<body>.*?)\n```", re.S)
BACKGROUND = re.compile(r"\s&\s*(#.*)?$")
# what a fresh clone does not have: made by run.sh, the clients, the gateway or the tests
NOT_IN_A_CLONE = {".git", "ckpts", "build", "out", "voices", ".pytest_cache", "__pycache__"}
RUN_SH_VARIABLES = ("CKPT_DIR", "MODEL_DIR", "BUILD_DIR", "MODEL_REPO", "OUT_DIR", "LOG_DIR", "PID_FILE",
                    "SERVER_LOG", "TRITON_LOG", "SERVE_DETACH", "F5_TRITON_HOST", "BACKEND", "TARGET", "RANDOM_WEIGHTS", "F5_MODEL",
                    "NFE", "REF_AUDIO", "REF_TEXT", "MAX_BATCH_SIZE", "GPUS", "REPO_ARGS", "F5_TRITON_GATEWAY_KEY")


def readme_blocks() -> dict[str, tuple[str, str]]:
    """name -> (language, body) of every tested block of README.md."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    return {m["name"]: (m["lang"], m["body"]) for m in BLOCK.finditer(text)}


def shell_commands(body: str) -> list[str]:
    """Commands of a sh block: continuation lines joined, blank lines and comment-only lines dropped."""
    commands, current = [], ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        command = (current + line).strip()
        current = ""
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def test_readme_has_the_tested_blocks():
    blocks = readme_blocks()
    assert {"quick-start", "client-python", "gateway", "gateway-python"} <= set(blocks)
    quick = shell_commands(blocks["quick-start"][1])
    assert quick[0].startswith("SERVE_DETACH=1 bash run.sh serve --random-weights")
    assert any("client_http.py" in c for c in quick) and any("client_grpc.py --streaming" in c for c in quick)


class Clone:
    """A folder that looks like a fresh clone (tracked files linked from this checkout, .venv too)."""

    def __init__(self, root: Path, ports: dict[str, int]):
        self.root = root
        self.ports = ports
        for entry in REPO.iterdir():
            if entry.name not in NOT_IN_A_CLONE and not entry.name.endswith(".egg-info"):
                (root / entry.name).symlink_to(entry)
        (root / "ckpts").mkdir()  # a clone has ckpts/.gitkeep
        env = {k: v for k, v in os.environ.items() if k not in RUN_SH_VARIABLES}
        env.update(HTTP_PORT=str(ports["http"]), GRPC_PORT=str(ports["grpc"]), METRICS_PORT=str(ports["metrics"]),
                   GATEWAY_PORT=str(ports["gateway"]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                   NO_PROXY="localhost,127.0.0.1", no_proxy="localhost,127.0.0.1",
                   # .venv/bin/f5-triton imports this checkout's package even where .venv is another's
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.env = env
        self.background: list[subprocess.Popen] = []

    def localize(self, text: str) -> str:
        for default, name in (("8000", "http"), ("8001", "grpc"), ("8080", "gateway")):
            text = text.replace(f"localhost:{default}", f"localhost:{self.ports[name]}")
        return text

    def run(self, command: str, timeout: float = 900) -> subprocess.CompletedProcess:
        result = subprocess.run(["bash", "-c", self.localize(command)], cwd=self.root, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    def start(self, command: str) -> subprocess.Popen:
        command = BACKGROUND.sub("", self.localize(command))
        process = subprocess.Popen(["bash", "-c", f"exec {command}"], cwd=self.root, env=self.env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.background.append(process)
        return process

    def run_python(self, name: str, body: str) -> subprocess.CompletedProcess:
        script = self.root / "out" / f"readme_{name}.py"
        script.parent.mkdir(exist_ok=True)
        script.write_text(self.localize(body))
        return self.run(f".venv/bin/python {script}")

    def has_module(self, name: str) -> bool:
        """Whether the interpreter `run_python` uses (the clone's .venv: this checkout's, or the one run.sh made
        with scripts/setup_env.sh, which installs the serving extras only) can import `name`."""
        python = self.root / ".venv" / "bin" / "python"
        return python.exists() and subprocess.run([str(python), "-c", f"import {name}"], cwd=self.root,
                                                  env=self.env, capture_output=True).returncode == 0


def wait_for_gateway(process: subprocess.Popen, port: int, timeout: float = 120) -> None:
    """Until the gateway's /health says Triton is ready (or the gateway died)."""
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stderr.read()
        try:
            with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
                    f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if json.load(response)["status"] == "ok":
                    return
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() < deadline, "the gateway did not become ready"
        time.sleep(0.2)


def free_ports(count: int) -> list[int]:
    from f5_triton.supervisor.server import free_port

    ports: set[int] = set()
    while len(ports) < count:  # free_port() may hand out the same port twice
        ports.add(free_port())
    return list(ports)


def audio(path: Path) -> float:
    """Seconds of a 24 kHz file."""
    wave, rate = sf.read(path, dtype="float32")
    assert rate == 24000 and len(wave) > 0, path
    return len(wave) / rate


def test_readme_commands_work_as_written(tmp_path):
    if shutil.which("curl") is None:
        if os.environ.get("F5_REQUIRE_TEST_TOOLS"):  # CI installs it: missing there is a failure
            pytest.fail("the README's gateway lines need curl")
        pytest.skip("the README's gateway lines use curl")
    blocks = readme_blocks()
    clone = Clone(tmp_path, dict(zip(("http", "grpc", "metrics", "gateway"), free_ports(4))))
    try:
        quick = shell_commands(blocks["quick-start"][1])
        served = clone.run(quick[0])
        assert "server ready" in served.stdout and "NOISE, NOT SPEECH" in served.stdout
        outputs = {}
        for command in quick[1:]:
            result = clone.run(command)
            if "client_" in command:
                assert re.search(r"s of audio in [\d.]+ s \(RTF [\d.]+\)", result.stdout), result.stdout
                assert "RANDOM WEIGHTS" in result.stderr, result.stderr
            if "--streaming" in command:
                assert re.search(r"time to first audio: \d+ ms", result.stdout), result.stdout
            outputs[command] = result
        for name in ("http", "grpc", "streamed", "synth"):
            assert audio(tmp_path / "out" / f"{name}.wav") > 0.5
        assert "RANDOM WEIGHTS" in next(r.stderr for c, r in outputs.items() if "synth" in c)

        clone.run_python("client", blocks["client-python"][1])
        assert audio(tmp_path / "out" / "python.wav") > 0.5

        gateway = shell_commands(blocks["gateway"][1])
        assert BACKGROUND.search(gateway[0]) and "f5-triton gateway" in gateway[0]
        wait_for_gateway(clone.start(gateway[0]), clone.ports["gateway"])
        for command in gateway[1:]:
            clone.run(command)
        assert (tmp_path / "voices" / "nature.txt").read_text().startswith("Some call me nature")
        assert audio(tmp_path / "out" / "hello.wav") > 0.5

        if not clone.has_module("openai"):  # the README has users `pip install openai` themselves
            if os.environ.get("F5_REQUIRE_TEST_TOOLS"):  # CI's .venv is the dev one, which has it
                pytest.fail("the README's openai snippet needs openai in .venv (bash scripts/setup_env.sh dev)")
            pytest.skip("the README's openai snippet needs openai, which .venv lacks (bash scripts/setup_env.sh dev)")
        clone.run_python("openai", blocks["gateway-python"][1])
        assert audio(tmp_path / "out" / "hello-openai.wav") > 0.5
        assert (tmp_path / "out" / "streamed.pcm").stat().st_size > 24000  # 0.5 s of 16-bit samples
    finally:
        for process in clone.background:
            process.terminate()
            process.wait(30)
        stopped = subprocess.run(["bash", "run.sh", "stop"], cwd=tmp_path, env=clone.env, capture_output=True,
                                 text=True, timeout=150)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "server stopped" in stopped.stdout
