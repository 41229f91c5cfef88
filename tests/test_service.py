"""f5_triton.supervisor.service without a tritonserver: pid files, `f5-triton stop` / `status` on real
processes, and `serve --detach` reporting a server that exits before it is ready."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from f5_triton.supervisor.errors import TritonServerError
from f5_triton.supervisor.service import PidFile, detach, stop

# A stand-in for `f5-triton serve`: its command line names it, as run.sh's stage 4 starts it.
SLEEPER = "import signal, sys, time; {setup}; time.sleep(120)"


def fake_serve(ignore_sigterm: bool = False) -> subprocess.Popen:
    setup = "signal.signal(signal.SIGTERM, signal.SIG_IGN)" if ignore_sigterm else "pass"
    process = subprocess.Popen([sys.executable, "-c", SLEEPER.format(setup=setup), "f5_triton.cli", "serve"])
    time.sleep(0.3)  # the handler is in place
    return process


def f5(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "f5_triton.cli", *args], capture_output=True, text=True, timeout=120)


def test_pid_file_names_only_a_running_serve_process(tmp_path):
    pid_file = PidFile(tmp_path / "server.pid")
    assert pid_file.served_file == tmp_path / "server.model"
    assert PidFile(tmp_path / "server").served_file == tmp_path / "server.model"
    assert pid_file.running_pid() is None  # no file
    pid_file.write()  # this pytest process: running, but not f5-triton serve (a reused pid)
    assert pid_file.running_pid() is None
    process = fake_serve()
    try:
        pid_file.write(process.pid)
        assert pid_file.running_pid() == process.pid
        pid_file.served_file.write_text("random-tiny 1\n")
        pid_file.remove(only_pid=process.pid + 1)  # the file names another process now: left alone
        assert pid_file.path.exists()
    finally:
        process.kill()
        process.wait()
    assert pid_file.running_pid() is None  # the process is gone
    pid_file.remove(only_pid=process.pid)
    assert not pid_file.path.exists() and not pid_file.served_file.exists()


def test_stop_terminates_and_cleans_up(tmp_path):
    pid_file = PidFile(tmp_path / "server.pid")
    process = fake_serve()
    pid_file.write(process.pid)
    pid_file.served_file.write_text("random-tiny 1\n")
    logs: list[str] = []
    try:
        assert stop(pid_file, timeout=30, log=logs.append)
        assert process.wait(timeout=5) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    assert logs[0].startswith(f"stopping the server (pid {process.pid})") and logs[-1] == "server stopped"
    assert not pid_file.path.exists() and not pid_file.served_file.exists()
    logs.clear()
    assert not stop(pid_file, log=logs.append)
    assert logs == [f"no server running (pid file {pid_file.path})"]


def test_stop_kills_a_server_that_ignores_sigterm(tmp_path):
    pid_file = PidFile(tmp_path / "server.pid")
    process = fake_serve(ignore_sigterm=True)
    pid_file.write(process.pid)
    logs: list[str] = []
    try:
        started = time.monotonic()
        assert stop(pid_file, timeout=1.0, log=logs.append)
        assert time.monotonic() - started < 10
        assert process.wait(timeout=5) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert "killing it" in logs[1]


def test_stop_and_status_commands(tmp_path):
    pid_file = tmp_path / "logs" / "server.pid"
    result = f5("status", "--pid-file", str(pid_file))
    assert result.returncode == 1 and "no server running" in result.stderr
    process = fake_serve()
    try:
        PidFile(pid_file).write(process.pid)
        result = f5("status", "--pid-file", str(pid_file))
        assert result.returncode == 0 and result.stdout.strip() == str(process.pid)
        result = f5("stop", "--pid-file", str(pid_file))
        assert result.returncode == 0 and "server stopped" in result.stdout
        process.wait(timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
    result = f5("stop", "--pid-file", str(pid_file))
    assert result.returncode == 0 and "no server running" in result.stdout


def test_detach_reports_a_server_that_exits_before_it_is_ready(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("banner\n")
    with pytest.raises(TritonServerError, match="exited before it was ready") as error:
        detach(["--model-repo", str(tmp_path / "no-repo")], log, ready_timeout=60)
    assert "is not a folder" in str(error.value)  # f5-triton serve's own message, from the log
    assert log.read_text().startswith("banner\n")  # appended to
