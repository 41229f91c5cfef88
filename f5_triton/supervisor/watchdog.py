"""Replace python-backend stubs that died: :class:`StubWatchdog` and the /proc helpers it reads."""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from f5_triton.supervisor.errors import TritonServerError

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class StubReplacement:
    """One recovery by :class:`StubWatchdog`."""

    model: str
    instance: str  #: e.g. flow_matching_cpu_0_0
    dead_pid: int
    at: float  #: time.time() when the death was seen
    seconds: float  #: how long the replacement took (the new instance loaded)
    error: str | None = None  #: why it failed, or None


class Supervised(Protocol):
    """What the watchdog needs of the server it watches (`server.TritonServer`, which starts the watchdog)."""

    @property
    def pid(self) -> int | None: ...

    def is_running(self) -> bool: ...

    def replace_instance(self, model: str, instance: str, generation: int = 1) -> int: ...


class StubWatchdog(threading.Thread):
    """Replaces any python-backend stub of ``server`` that died, by :meth:`TritonServer.replace_instance`.

    The server's child processes are read from /proc at start and every ``interval`` seconds, and the
    watchdog also wakes the moment a known stub exits (a pidfd per stub). A stub's command line names
    its model file (``<repo>/<model>/<version>/model.py``) and its instance. tritonserver reaps the
    stubs it ends itself (unloads, replacements, the short-lived auto-complete stubs) but not one that
    died under it, which stays a zombie: a known stub still a zombie ``debounce`` seconds after it
    exited has its instance replaced; a failed replacement is tried again after ``retry_after``
    seconds. Recoveries are recorded in ``replacements``.
    """

    def __init__(self, server: Supervised, interval: float = 1.0, retry_after: float = 10.0,
                 debounce: float = 0.2):
        super().__init__(name=f"stub-watchdog-{server.pid}", daemon=True)
        self.server = server
        self.interval = interval
        self.retry_after = retry_after
        self.debounce = debounce
        self.replacements: list[StubReplacement] = []
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()

    def run(self) -> None:
        live: dict[int, tuple[str, str, int | None]] = {}  # stub pid -> (model, instance, pidfd)
        failed: dict[tuple[str, str], tuple[int, float]] = {}  # (model, instance) -> (dead pid, when it failed)
        try:
            while not self._stopped.is_set():
                pid = self.server.pid
                if pid is None or not self.server.is_running():
                    return
                stubs = python_stubs(pid)
                if any(stubs.get(stub, ("?",))[0] == "Z" for stub in live):
                    # exited just now: give tritonserver a moment to reap a stub it ended itself
                    if self._stopped.wait(self.debounce):
                        return
                    stubs = python_stubs(pid)
                for stub, (state, model) in stubs.items():
                    if state != "Z" and model and stub not in live:
                        instance = _stub_instance(stub)
                        if instance:
                            live[stub] = (model, instance, _pidfd(stub))
                for stub in [stub for stub in live if stub not in stubs]:  # ended and reaped by tritonserver
                    _close(live.pop(stub)[2])
                due = {}
                for stub in [stub for stub in live if stubs[stub][0] == "Z"]:
                    model, instance, fd = live.pop(stub)
                    _close(fd)
                    due[(model, instance)] = stub
                due.update({key: p for key, (p, when) in failed.items() if time.time() - when >= self.retry_after})
                for (model, instance), stub in due.items():
                    if self._stopped.is_set():
                        return
                    failed.pop((model, instance), None)
                    LOGGER.warning("python backend stub %d (%s of %s) died; replacing the instance", stub,
                                   instance, model)
                    start = time.time()
                    try:
                        self.server.replace_instance(model, instance, generation=len(self.replacements) + 1)
                        error = None
                    except TritonServerError as exc:
                        error = str(exc)
                        failed[(model, instance)] = (stub, time.time())
                        LOGGER.error("%s", error)
                    self.replacements.append(StubReplacement(model, instance, stub, start, time.time() - start,
                                                             error))
                fds = [fd for _, _, fd in live.values() if fd is not None]
                if fds:
                    select.select(fds, [], [], self.interval)
                elif self._stopped.wait(self.interval):
                    return
        finally:
            for _, _, fd in live.values():
                _close(fd)


def _stub_instance(pid: int) -> str | None:
    """The model instance a python-backend stub serves (its 8th argument), e.g. ``flow_matching_cpu_0_0``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return os.fsdecode(argv[8]) if len(argv) > 8 else None


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when process ``pid`` exits (Linux 5.3+), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def child_processes(parent: int) -> dict[int, tuple[str, str]]:
    """The child processes of ``parent`` from /proc: pid -> (state, command name)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split at the last ')'
            head, tail = stat.read_text().rsplit(")", 1)
            state, ppid = tail.split()[:2]
            if int(ppid) == parent:
                children[int(stat.parent.name)] = (state, head.split("(", 1)[1])
        except (OSError, IndexError, ValueError):
            continue
    return children


def python_stubs(server_pid: int) -> dict[int, tuple[str, str | None]]:
    """Child processes of ``server_pid`` that are python-backend stubs: pid -> (state, model name).

    The model name is None for zombies, whose command line is gone.
    """
    stubs = {}
    for pid, (state, comm) in child_processes(server_pid).items():
        if not comm.startswith("triton_python"):
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        model = None
        if len(argv) > 1 and argv[1].endswith(b".py"):
            model = Path(os.fsdecode(argv[1])).parents[1].name
        stubs[pid] = (state, model)
    return stubs
