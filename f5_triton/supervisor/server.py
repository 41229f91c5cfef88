"""A ``tritonserver`` child process serving one model repository.

:class:`TritonServer` starts the server with locked-down defaults (strict
readiness, admin-key protected repository / shared-memory / logging / trace APIs,
a request-size cap where the binary has one), waits for readiness and stops it again.

Python-backend stubs that die (kill -9, the OOM killer, a segfault in an extension)
are not restarted by tritonserver 2.51: the python backend dropped its restart in
24.06, and the dead instance keeps taking batches and answering each, after a second,
"Stub process '<instance>' is not healthy" (INTERNAL) while the health endpoints still
say ready. Unless ``recover_stubs=False``, :class:`TritonServer` therefore runs Triton
with explicit model control (the repository API stays behind the admin key) and a
watchdog thread (:mod:`f5_triton.supervisor.watchdog`) that replaces the dead instance
(:meth:`TritonServer.replace_instance`): a load with the model's configuration changed
only in its instance groups, which Triton applies in place -- the other instances keep
serving, and a model rendered with one group per instance plus a passive standby
(f5_triton.repository) has the dead one taken out of service at once, so that
requests wait in the queue for its replacement.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

from f5_triton.config import DEFAULT_SERVER
from f5_triton.supervisor.errors import TritonServerError
from f5_triton.supervisor.install import TritonInstall, find_tritonserver
from f5_triton.supervisor.watchdog import StubReplacement, StubWatchdog

LOGGER = logging.getLogger(__name__)

#: HTTP request header that unlocks the restricted APIs.
ADMIN_KEY_HEADER = "admin-key"
#: gRPC metadata key for the same: tritonserver prefixes the configured key with this.
GRPC_ADMIN_KEY_HEADER = "triton-grpc-protocol-" + ADMIN_KEY_HEADER
#: Environment variable read for the admin key when none is passed explicitly.
ADMIN_KEY_ENV = "F5_TRITON_ADMIN_KEY"
#: Endpoint groups that require the admin key. ``model-repository`` and
#: ``shared-memory`` let a caller load models or map host memory; ``logging`` and
#: ``trace`` can redirect server output to files.
DEFAULT_RESTRICTED_APIS: tuple[str, ...] = ("model-repository", "shared-memory", "logging", "trace")
#: Request-size flags of newer tritonserver releases (2.51 has neither): flag -> body encoding
#: whose worst case sizes the default (:meth:`f5_triton.config.Limits.max_request_bytes`).
_INPUT_SIZE_FLAGS = {"--http-max-input-size": "json", "--grpc-max-input-size": "binary"}


def free_port() -> int:
    """Return a TCP port that was free a moment ago (for tests; racy by nature)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int, address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR ignores TIME_WAIT leftovers of a previous server but still fails on a listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return True
    return False


@dataclass(frozen=True)
class ServerUrls:
    """Where a running server can be reached from this host."""

    http: str  #: e.g. ``http://127.0.0.1:8000``
    grpc: str  #: gRPC target, e.g. ``127.0.0.1:8001`` (no scheme)
    metrics: str  #: Prometheus endpoint, e.g. ``http://127.0.0.1:8002/metrics``

    @property
    def http_hostport(self) -> str:
        """The HTTP address without scheme, as ``tritonclient.http`` expects it."""
        return self.http.split("://", 1)[-1]


class TritonServer:
    """A ``tritonserver`` child process serving one model repository.

    Use as a context manager (start, wait until ready, stop on exit) or call
    :meth:`start`, :meth:`wait_ready` and :meth:`stop` directly. The process runs
    in its own session / process group so that a Ctrl-C in the terminal reaches
    only the Python parent, which then shuts the server down in order.

    Args:
        model_repo: model repository folder.
        http_port, grpc_port, metrics_port: listening ports.
        log_verbose: ``--log-verbose`` level.
        extra_args: further ``tritonserver`` arguments, appended last.
        env: base environment (default: ``os.environ``); the install's additions are applied on top.
        install: the installation to run (default: :func:`find_tritonserver`).
        admin_key: value of the ``admin-key`` header (gRPC: ``triton-grpc-protocol-admin-key``)
            that unlocks the restricted APIs; defaults to ``$F5_TRITON_ADMIN_KEY`` or a random token.
        restricted_apis: endpoint groups that require the admin key; empty disables restriction.
        bind_address: address for the HTTP, gRPC and metrics listeners (server default: all interfaces).
        log_path: file receiving the server's stdout and stderr (default: a new temporary file).
        ready_timeout: seconds :meth:`__enter__` waits for readiness.
        exit_timeout_secs: ``--exit-timeout-secs``: how long a graceful shutdown waits for
            in-flight requests *and for idle HTTP keep-alive connections* to go away.
        recover_stubs: reload a model whose python-backend stub died (see the module docstring).
            Needs explicit model control, used only while ``model-repository`` is among
            ``restricted_apis``; otherwise the server runs with ``--model-control-mode=none``.
        max_request_bytes: request-size caps, ``{"json": n, "binary": n}`` (default: from
            :data:`f5_triton.config.DEFAULT_LIMITS`), passed as ``--http-max-input-size`` /
            ``--grpc-max-input-size`` when the binary knows these flags (2.51 does not: put a
            proxy with a body limit in front of it). ``None`` leaves the server defaults.

    Attributes:
        log_path: the server log, set by :meth:`start`.
        shm_region_prefix: unique prefix of this server's python-backend regions in ``/dev/shm``.
    """

    def __init__(
        self,
        model_repo: str | os.PathLike[str],
        http_port: int = DEFAULT_SERVER.http_port,
        grpc_port: int = DEFAULT_SERVER.grpc_port,
        metrics_port: int = DEFAULT_SERVER.metrics_port,
        log_verbose: int = DEFAULT_SERVER.log_verbose,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        install: TritonInstall | None = None,
        admin_key: str | None = None,
        restricted_apis: Sequence[str] = DEFAULT_RESTRICTED_APIS,
        bind_address: str | None = None,
        log_path: str | os.PathLike[str] | None = None,
        ready_timeout: float = 300.0,
        exit_timeout_secs: int = 30,
        recover_stubs: bool = True,
        max_request_bytes: Mapping[str, int] | None | Literal["default"] = "default",
    ) -> None:
        self.model_repo = Path(model_repo).absolute()
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.env = dict(env) if env is not None else None
        self.admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or secrets.token_urlsafe(24)
        self.restricted_apis = tuple(restricted_apis)
        self.bind_address = bind_address
        self.ready_timeout = ready_timeout
        self.exit_timeout_secs = exit_timeout_secs
        self._install = install
        self._log_path_arg = Path(log_path) if log_path is not None else None
        self.log_path: Path | None = self._log_path_arg
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._group_killed = False
        self.shm_region_prefix = f"f5triton{os.getpid()}_{secrets.token_hex(4)}_"
        self._lock = threading.Lock()
        self.recover_stubs = recover_stubs and "model-repository" in self.restricted_apis
        if recover_stubs and not self.recover_stubs:
            LOGGER.warning("stub recovery needs explicit model control, which is only safe with the "
                           "model-repository API restricted; running with --model-control-mode=none")
        if max_request_bytes == "default":
            from f5_triton.config import DEFAULT_LIMITS

            max_request_bytes = {e: DEFAULT_LIMITS.max_request_bytes(e) for e in ("json", "binary")}
        self.max_request_bytes = dict(max_request_bytes) if max_request_bytes is not None else None
        self._watchdog: StubWatchdog | None = None

    # -- configuration ---------------------------------------------------------------------------

    @property
    def install(self) -> TritonInstall:
        """The installation used (located on first access)."""
        if self._install is None:
            self._install = find_tritonserver()
        return self._install

    @property
    def admin_headers(self) -> dict[str, str]:
        """HTTP headers that unlock the restricted APIs (``headers=`` of ``tritonclient.http`` calls)."""
        return {ADMIN_KEY_HEADER: self.admin_key}

    @property
    def grpc_admin_headers(self) -> dict[str, str]:
        """gRPC metadata that unlocks the restricted APIs (``headers=`` of ``tritonclient.grpc`` calls)."""
        return {GRPC_ADMIN_KEY_HEADER: self.admin_key}

    @property
    def urls(self) -> ServerUrls:
        """HTTP, gRPC and metrics addresses, usable from this host."""
        host = self.bind_address if self.bind_address not in (None, "", "0.0.0.0") else "127.0.0.1"
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        return ServerUrls(
            http=f"http://{host}:{self.http_port}",
            grpc=f"{host}:{self.grpc_port}",
            metrics=f"http://{host}:{self.metrics_port}/metrics",
        )

    def command(self) -> list[str]:
        """The full ``tritonserver`` command line."""
        install = self.install
        cmd = [
            str(install.binary),
            f"--model-repository={self.model_repo}",
            *(["--model-control-mode=explicit", "--load-model=*"] if self.recover_stubs
              else ["--model-control-mode=none"]),
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={self.exit_timeout_secs}",
        ]
        if self.bind_address:
            cmd += [
                f"--http-address={self.bind_address}",
                f"--grpc-address={self.bind_address}",
                f"--metrics-address={self.bind_address}",
            ]
        if self.restricted_apis:
            rule = f"{','.join(self.restricted_apis)}:{ADMIN_KEY_HEADER}={self.admin_key}"
            cmd += [f"--http-restricted-api={rule}", f"--grpc-restricted-protocol={rule}"]
        if self.max_request_bytes:
            known = install.supported_flags()
            for flag, encoding in _INPUT_SIZE_FLAGS.items():
                if flag in known and encoding in self.max_request_bytes:
                    cmd.append(f"{flag}={self.max_request_bytes[encoding]}")
        if install.backend_directory is not None:
            cmd.append(f"--backend-directory={install.backend_directory}")
        if install.cache_directory is not None:
            cmd.append(f"--cache-directory={install.cache_directory}")
        # Python-backend shared-memory regions are named system-wide (/dev/shm); a unique
        # prefix keeps two servers on one host (parallel tests, several ranks) apart.
        cmd.append(f"--backend-config=python,shm-region-prefix-name={self.shm_region_prefix}")
        cmd += self.extra_args
        return cmd

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Process id of the server, once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status of the server, or ``None`` while it runs (or before start)."""
        return self._process.poll() if self._process is not None else None

    def is_running(self) -> bool:
        """Whether the server process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> TritonServer:
        """Spawn the server process; returns immediately (see :meth:`wait_ready`).

        Raises:
            TritonServerError: already started, or a port is taken.
        """
        with self._lock:
            if self._process is not None:
                raise TritonServerError("this TritonServer was already started; create a new one")
            address = self.bind_address or "0.0.0.0"
            busy = [p for p in (self.http_port, self.grpc_port, self.metrics_port) if _port_in_use(p, address)]
            if busy:
                # Checked up front: otherwise a server already on the port would answer our readiness probe.
                raise TritonServerError(f"port(s) {', '.join(map(str, busy))} already in use on {address}")
            cmd = self.command()
            env = self.install.environ(self.env)
            if self._log_path_arg is None:
                fd, name = tempfile.mkstemp(prefix="f5-triton-tritonserver-", suffix=".log")
                os.close(fd)
                self.log_path = Path(name)
            else:
                self._log_path_arg.parent.mkdir(parents=True, exist_ok=True)
                self.log_path = self._log_path_arg
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
            LOGGER.info("starting %s (log: %s)", " ".join(cmd), self.log_path)
            try:
                self._process = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=self._log_file,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                self._log_file.close()
                self._log_file = None
                raise TritonServerError(f"could not run {cmd[0]}: {exc}") from exc
        return self

    def wait_ready(self, timeout: float = 300.0, interval: float = 0.2) -> None:
        """Block until ``/v2/health/ready`` answers 200.

        Raises:
            TritonServerError: the process exited or ``timeout`` seconds passed;
                the message holds the end of the server log.
        """
        if self._process is None:
            raise TritonServerError("server not started; call start() first")
        url = f"{self.urls.http}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while True:
            code = self._process.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with status {code} before becoming ready "
                    f"(log: {self.log_path}):\n{self.log_tail()}"
                )
            if _http_ok(url):
                if self.recover_stubs and self._watchdog is None:
                    self._watchdog = StubWatchdog(self)
                    self._watchdog.start()
                return
            if time.monotonic() >= deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout:.0f} s (log: {self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(interval)

    def stop(self, grace: float | None = None, term_grace: float = 5.0) -> int | None:
        """Shut the server down: SIGINT, then SIGTERM and SIGKILL if it lingers.

        ``grace`` seconds (default: ``exit_timeout_secs`` + 5) are allowed for the
        graceful SIGINT shutdown (in-flight requests finish, models are unloaded),
        then ``term_grace`` seconds after SIGTERM, then SIGKILL; a zero skips that
        step. Safe to call repeatedly and on a server that was never started.
        Returns the exit status, if any.
        """
        if grace is None:
            grace = self.exit_timeout_secs + 5.0
        if self._watchdog is not None:  # stubs exit on shutdown: that is no reason to reload
            self._watchdog.stop()
        with self._lock:
            process = self._process
            if process is not None and process.poll() is None:
                for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, term_grace)):
                    if wait <= 0:
                        continue
                    try:
                        process.send_signal(sig)
                        process.wait(timeout=wait)
                        break
                    except subprocess.TimeoutExpired:
                        LOGGER.warning("tritonserver (pid %d) still running %.0f s after %s", process.pid, wait, sig.name)
                else:
                    process.kill()
                    process.wait()
            if process is not None and not self._group_killed:
                # Python-backend stubs share the server's process group; kill any the server left
                # behind. Only once, right after the server exited, so a recycled pid is never hit.
                self._group_killed = True
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                _remove_shm_regions(self.shm_region_prefix)
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            return process.returncode if process is not None else None

    @property
    def stub_replacements(self) -> list[StubReplacement]:
        """Instances replaced because their python-backend stub died, oldest first."""
        return list(self._watchdog.replacements) if self._watchdog is not None else []

    def model_config(self, name: str) -> dict:
        """The configuration of loaded model ``name`` (Triton's JSON form)."""
        with _NO_PROXY_OPENER.open(f"{self.urls.http}/v2/models/{name}/config", timeout=30) as response:
            return dict(json.loads(response.read()))

    def load_model(self, name: str, config: Mapping | None = None, timeout: float = 600.0) -> None:
        """Load model ``name``, with ``config`` overriding its configuration (uses the admin key).

        A configuration that differs from the loaded one only in ``instance_group`` is applied in place:
        instances whose group settings (name and count aside) are unchanged keep running, the others are
        created or removed.

        Raises:
            TritonServerError: the server refused or failed the load.
        """
        body = json.dumps({"parameters": {"config": json.dumps(config)}} if config is not None else {}).encode()
        request = urllib.request.Request(f"{self.urls.http}/v2/repository/models/{name}/load", data=body,
                                         method="POST", headers={"Content-Type": "application/json",
                                                                 **self.admin_headers})
        try:
            with _NO_PROXY_OPENER.open(request, timeout=timeout):
                pass
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise TritonServerError(f"loading {name} failed: HTTP {exc.code} {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise TritonServerError(f"loading {name} failed: {exc}") from exc

    def replace_instance(self, model: str, instance: str, generation: int = 1) -> int:
        """Replace instance ``instance`` of ``model`` (its stub died) by a new one; returns the loads made.

        An instance alone in its group, beside other groups, is replaced in two loads: without its group
        (Triton stops giving it requests; with no active instance left, requests queue) and with it again
        (a new instance). Otherwise its whole group is made anew, under a host-policy name marked with
        ``generation``, while the dead instance keeps failing the batches it takes.

        Raises:
            TritonServerError: no group holds ``instance``, or a load failed.
        """
        config = self.model_config(model)
        groups = config.get("instance_group", [])
        owners = [g for g in groups if instance.startswith(g["name"] + "_")]
        if not owners:
            raise TritonServerError(f"no instance group of {model} holds instance {instance}")
        group = max(owners, key=lambda g: len(g["name"]))
        if group["count"] == 1 and len(groups) > 1:
            self.load_model(model, {**config, "instance_group": [g for g in groups if g is not group]})
            self.load_model(model, config)
            return 2
        policy = re.sub(r"~\d+$", "", group.get("host_policy") or group["name"]) + f"~{generation}"
        self.load_model(model, {**config, "instance_group": [{**g, "host_policy": policy} if g is group else g
                                                            for g in groups]})
        return 1

    def kill(self) -> int | None:
        """Stop the server at once (SIGKILL to its whole process group); idempotent."""
        return self.stop(grace=0.0, term_grace=0.0)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the server log ('' if there is none yet)."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(deque(f, maxlen=lines))

    def __enter__(self) -> TritonServer:
        self.start()
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else ("stopped" if self._process else "not started")
        return f"TritonServer({str(self.model_repo)!r}, http={self.http_port}, grpc={self.grpc_port}, {state})"



def _remove_shm_regions(prefix: str) -> None:
    """Delete python-backend shared-memory regions a killed server could not clean up.

    They live in /dev/shm (tmpfs, i.e. RAM) until removed; the prefix is unique to
    one :class:`TritonServer`, so nothing else is touched.
    """
    shm_dir = Path("/dev/shm")
    if not shm_dir.is_dir():
        return
    for region in shm_dir.glob(f"{prefix}*"):
        try:
            region.unlink()
        except OSError:
            pass


# No proxies: an http_proxy in the environment must not intercept the local health probe.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str) -> bool:
    try:
        with _NO_PROXY_OPENER.open(url, timeout=2.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
