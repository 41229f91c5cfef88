"""``f5-triton serve`` as a service: in the foreground until Ctrl-C or SIGTERM (:func:`run_forever`), or
detached in a session of its own (:func:`detach`); its pid in a pid file (:class:`PidFile`), through which
``f5-triton status`` finds it and ``f5-triton stop`` stops it."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from f5_triton.supervisor.errors import TritonServerError
from f5_triton.supervisor.server import TritonServer
from f5_triton.supervisor.watchdog import child_processes

#: What :func:`run_forever` prints once the server is ready (and :func:`detach` waits for).
READY_LINE = "f5-triton: server ready"
#: A command line of ``f5-triton serve`` (module or console script): a pid file's pid that is not one is stale.
_SERVE_COMMAND = re.compile(r"(f5_triton\.cli|f5-triton) serve\b")


def run_forever(server: TritonServer, ready_timeout: float | None = None) -> int:
    """Start ``server`` if needed, announce readiness and serve until Ctrl-C / SIGTERM.

    Prints ``f5-triton: server ready  http=... grpc=... metrics=... (listening on ADDRESS)`` once ready: the URLs
    to use from this host, and the address the ports are bound to.
    On SIGINT or SIGTERM the server is stopped gracefully and 0 is returned; if
    the server dies on its own, its log tail goes to stderr and its exit status
    (or 1) is returned. Must run in the main thread (it installs a SIGTERM handler).
    """
    stop_requested = threading.Event()

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if server.pid is None:
            server.start()
        server.wait_ready(server.ready_timeout if ready_timeout is None else ready_timeout)
        urls = server.urls
        address = server.bind_address or "0.0.0.0"  # tritonserver's default: all interfaces
        everyone = ", all interfaces" if address in ("0.0.0.0", "::") else ""
        print(f"{READY_LINE}  http={urls.http} grpc={urls.grpc} metrics={urls.metrics} "
              f"(listening on {address}{everyone})", flush=True)
        while not stop_requested.wait(0.5):
            code = server.returncode
            if code is not None:
                print(
                    f"f5-triton: tritonserver exited with status {code} (log: {server.log_path}):\n"
                    f"{server.log_tail()}",
                    file=sys.stderr,
                    flush=True,
                )
                return code or 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        try:
            server.stop()
        except KeyboardInterrupt:  # a second Ctrl-C while shutting down: do not wait any longer
            print("f5-triton: interrupted again, killing tritonserver", file=sys.stderr, flush=True)
            server.kill()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (Z: exited, not yet reaped), or None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"  # no /proc (or not readable): it exists


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


class PidFile:
    """The pid file of an ``f5-triton serve`` process, and the ``.model`` file beside it (what it serves,
    written by run.sh's stage 4; ``server.pid`` -> ``server.model``)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @property
    def served_file(self) -> Path:
        stem = self.path.name[:-len(".pid")] if self.path.name.endswith(".pid") else self.path.name
        return self.path.with_name(stem + ".model")

    def write(self, pid: int | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{os.getpid() if pid is None else pid}\n")

    def running_pid(self) -> int | None:
        """The pid in the file, if that process runs and is ``f5-triton serve`` (pids are reused)."""
        try:
            pid = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None
        if pid <= 0 or not _alive(pid):
            return None
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return pid  # no /proc: trust the file
        return pid if _SERVE_COMMAND.search(argv) else None

    def remove(self, only_pid: int | None = None) -> None:
        """Delete the pid and served files (with ``only_pid``: only while the pid file still names it)."""
        if only_pid is not None:
            with contextlib.suppress(OSError, ValueError):
                if int(self.path.read_text().strip()) != only_pid:
                    return
        for path in (self.path, self.served_file):
            path.unlink(missing_ok=True)


def stop(pid_file: PidFile, timeout: float = 90.0, log: Callable[[str], None] = print) -> bool:
    """Stop the server ``pid_file`` names: SIGTERM (in-flight requests finish, as ``docker stop`` does), then,
    after ``timeout`` seconds, SIGKILL to it and to the process groups of its children (tritonserver runs in
    a group of its own). Returns whether one was running; the pid and served files are gone after."""
    pid = pid_file.running_pid()
    if pid is None:
        log(f"no server running (pid file {pid_file.path})")
        pid_file.remove()
        return False
    log(f"stopping the server (pid {pid}): in-flight requests finish first")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            log(f"still running after {timeout:.0f}s, killing it")
            for child in child_processes(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(child, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.2)
    # Exited: give its parent (init, for a detached server) a moment to reap it, so that the pid is free when
    # this returns. A parent that waits for this command to return first (a foreground run.sh in a test) is not
    # waited for longer than that moment.
    reaped = time.monotonic() + 5.0
    while _state(pid) is not None and time.monotonic() < reaped:
        time.sleep(0.05)
    pid_file.remove()
    log("server stopped")
    return True


def detach(serve_args: Sequence[str], log_path: Path, ready_timeout: float) -> int:
    """Start ``f5-triton serve serve_args`` in a session of its own, its output appended to ``log_path``,
    and return its pid once it printed :data:`READY_LINE`.

    Raises:
        TritonServerError: it exited before it was ready (the log's tail in the message), or was not ready
            after ``ready_timeout`` seconds (it is left running).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "f5_triton.cli", "serve", *serve_args],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    deadline = time.monotonic() + ready_timeout
    while True:
        text = log_path.read_text(errors="replace")
        if READY_LINE in text:
            return process.pid
        tail = "".join(deque(text.splitlines(keepends=True), maxlen=40))
        if process.poll() is not None:
            raise TritonServerError(f"the server exited before it was ready (log: {log_path}):\n{tail}")
        if time.monotonic() >= deadline:
            raise TritonServerError(f"server not ready after {ready_timeout:.0f}s; it is still running "
                                    f"(pid {process.pid}):\n{tail}")
        time.sleep(0.5)
