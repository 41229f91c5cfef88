"""Find and run a ``tritonserver`` process for an f5-triton model repository.

Two installations are supported:

* a ``tritonserver`` on ``PATH`` (or ``/opt/tritonserver/bin``), as in the NGC
  ``nvcr.io/nvidia/tritonserver`` containers;
* the server bundled in the ``nvidia-pytriton`` wheel. It has no usable backend
  directory out of the box: the python backend is shipped without its stub, and
  one stub per Python version lives in ``pytriton/tritonserver/python_backend_stubs``.
  :func:`find_tritonserver` assembles a backend directory under a cache folder and
  computes the environment the server and its python-backend stubs need.

The python backend stub is a separate process that embeds ``libpython``. It does
not know about virtual environments by itself: when no program name is set, the
embedded interpreter searches ``PATH`` for ``python3`` and derives ``sys.prefix``
from what it finds (``pyvenv.cfg`` included). Putting the running interpreter's
``bin`` folder first on ``PATH`` therefore gives the stub this environment's
site-packages, ``.pth`` files and editable installs included -- the same trick
PyTriton uses.

:class:`TritonServer` starts the server with locked-down defaults (strict
readiness, admin-key protected repository / shared-memory / logging / trace APIs,
a request-size cap where the binary has one), waits for readiness and stops it again.

Python-backend stubs that die (kill -9, the OOM killer, a segfault in an extension)
are not restarted by tritonserver 2.51: the python backend dropped its restart in
24.06, and the dead instance keeps taking batches and answering each, after a second,
"Stub process '<instance>' is not healthy" (INTERNAL) while the health endpoints still
say ready. Unless ``recover_stubs=False``, :class:`TritonServer` therefore runs Triton
with explicit model control (the repository API stays behind the admin key) and a
watchdog thread that replaces the dead instance (:meth:`TritonServer.replace_instance`):
a load with the model's configuration changed only in its instance groups, which Triton
applies in place -- the other instances keep serving, and a model rendered with one group
per instance plus a passive standby (f5_triton.serving.repository) has the dead one taken
out of service at once, so that requests wait in the queue for its replacement.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import secrets
import select
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Literal

__all__ = [
    "ADMIN_KEY_ENV",
    "ADMIN_KEY_HEADER",
    "DEFAULT_RESTRICTED_APIS",
    "GRPC_ADMIN_KEY_HEADER",
    "ServerUrls",
    "StubReplacement",
    "StubWatchdog",
    "TritonInstall",
    "TritonNotFoundError",
    "TritonServer",
    "TritonServerError",
    "find_tritonserver",
    "free_port",
    "python_stubs",
    "run_forever",
]

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

_NGC_BINARY = Path("/opt/tritonserver/bin/tritonserver")
#: Request-size flags of newer tritonserver releases (2.51 has neither): flag -> body encoding
#: whose worst case sizes the default (:meth:`f5_triton.config.Limits.max_request_bytes`).
_INPUT_SIZE_FLAGS = {"--http-max-input-size": "json", "--grpc-max-input-size": "binary"}
_PATH_LIST_VARS = frozenset({"PATH", "LD_LIBRARY_PATH", "PYTHONPATH"})
_NOT_FOUND_HINT = "pip install nvidia-pytriton or run inside an NGC tritonserver container"


class TritonNotFoundError(RuntimeError):
    """No usable ``tritonserver`` installation was found."""


class TritonServerError(RuntimeError):
    """The server could not be started, did not become ready, or died."""


@dataclass(frozen=True)
class TritonInstall:
    """A ``tritonserver`` binary and what it needs to run.

    Attributes:
        binary: path of the ``tritonserver`` executable.
        backend_directory: value for ``--backend-directory``; ``None`` keeps the
            server default (``/opt/tritonserver/backends``).
        env: environment additions. ``PATH``, ``LD_LIBRARY_PATH`` and
            ``PYTHONPATH`` values are prepended to the existing value, others replace it.
        cache_directory: value for ``--cache-directory`` (response cache
            implementations), or ``None`` for the server default.
        bundled: whether this is the server shipped in ``nvidia-pytriton``.
    """

    binary: Path
    backend_directory: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    cache_directory: Path | None = None
    bundled: bool = False

    def supported_flags(self) -> frozenset[str]:
        """The ``--flags`` that ``tritonserver --help`` lists (run once per binary)."""
        return _help_flags(str(self.binary), self.environ().get("LD_LIBRARY_PATH", ""))

    def environ(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return ``base`` (default: ``os.environ``) with :attr:`env` applied."""
        merged = dict(os.environ if base is None else base)
        for key, value in self.env.items():
            if key in _PATH_LIST_VARS and merged.get(key):
                merged[key] = _join_paths([value, merged[key]])
            else:
                merged[key] = value
        return merged


@functools.lru_cache(maxsize=8)
def _help_flags(binary: str, ld_library_path: str) -> frozenset[str]:
    env = {**os.environ, "LD_LIBRARY_PATH": ld_library_path}
    try:
        result = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        LOGGER.warning("could not run %s --help: %s", binary, exc)
        return frozenset()
    return frozenset(re.findall(r"^\s+(--[a-z0-9-]+)", result.stdout + result.stderr, flags=re.MULTILINE))


def find_tritonserver(
    cache_dir: str | os.PathLike[str] | None = None,
    prefer: Literal["auto", "system", "bundled"] = "auto",
) -> TritonInstall:
    """Locate a ``tritonserver`` installation.

    Args:
        cache_dir: folder for the prepared backend directory of the bundled server.
            Defaults to ``$F5_TRITON_CACHE`` or ``$XDG_CACHE_HOME/f5-triton``
            (``~/.cache/f5-triton``).
        prefer: ``"auto"`` uses a system ``tritonserver`` if there is one and the
            nvidia-pytriton one otherwise; ``"system"`` / ``"bundled"`` allow only that one.

    Raises:
        TritonNotFoundError: no installation of the requested kind exists.
    """
    if prefer not in ("auto", "system", "bundled"):
        raise ValueError(f"prefer must be 'auto', 'system' or 'bundled', not {prefer!r}")
    if prefer in ("auto", "system"):
        binary = _system_binary()
        if binary is not None:
            return _system_install(binary)
        if prefer == "system":
            raise TritonNotFoundError(f"no tritonserver on PATH or at {_NGC_BINARY}; {_NOT_FOUND_HINT}")
    install = _bundled_install(Path(cache_dir) if cache_dir is not None else _default_cache_dir())
    if install is None:
        raise TritonNotFoundError(
            f"tritonserver not found: no tritonserver on PATH or at {_NGC_BINARY}, "
            f"and nvidia-pytriton is not installed; {_NOT_FOUND_HINT}"
        )
    return install


def _system_binary() -> Path | None:
    found = shutil.which("tritonserver")
    if found:
        return Path(found).resolve()
    if _NGC_BINARY.is_file() and os.access(_NGC_BINARY, os.X_OK):
        return _NGC_BINARY
    return None


def _system_install(binary: Path) -> TritonInstall:
    # NGC layout: <prefix>/bin/tritonserver and <prefix>/backends/python/triton_python_backend_stub
    stub = binary.parent.parent / "backends" / "python" / "triton_python_backend_stub"
    if not stub.is_file():
        stub = Path("/opt/tritonserver/backends/python/triton_python_backend_stub")
    env: dict[str, str] = {}
    stub_version = _stub_python_version(stub) if stub.is_file() else None
    if stub_version == _python_version():
        env = _stub_python_env()
    elif stub_version is not None:
        LOGGER.warning(
            "the python backend stub %s embeds Python %s but f5-triton runs on Python %s: "
            "python models will not see this environment's packages",
            stub,
            stub_version,
            _python_version(),
        )
    backends = binary.parent.parent / "backends"
    return TritonInstall(binary=binary, backend_directory=backends if backends.is_dir() else None, env=env)


def _bundled_install(cache_dir: Path) -> TritonInstall | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    dist_dir = package_dir / "tritonserver"
    binary = dist_dir / "bin" / "tritonserver"
    if not binary.is_file():
        return None

    version = _python_version()
    stubs_dir = dist_dir / "python_backend_stubs"
    stub = stubs_dir / version / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
        raise TritonNotFoundError(
            f"nvidia-pytriton at {package_dir} has no python backend stub for Python {version} "
            f"(available: {', '.join(available) or 'none'}); use one of those Python versions "
            f"or run inside an NGC tritonserver container"
        )

    libpython = _shared_libpython()
    root = _prepare_bundled_dir(cache_dir, dist_dir, stub, libpython)

    libs = package_dir.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():  # editable install of pytriton itself
        libs = dist_dir / "external_libs"
    # The copied server pieces lose their $ORIGIN-relative RUNPATH, hence LD_LIBRARY_PATH.
    ld_paths = [str(root / "pylib")] if libpython is not None else []
    ld_paths.append(str(libs))
    env = _stub_python_env()
    env["LD_LIBRARY_PATH"] = _join_paths(ld_paths)
    caches = dist_dir / "caches"
    return TritonInstall(
        binary=binary,
        backend_directory=root / "backends",
        env=env,
        cache_directory=caches if caches.is_dir() else None,
        bundled=True,
    )


def _prepare_bundled_dir(cache_dir: Path, dist_dir: Path, stub: Path, libpython: Path | None) -> Path:
    """Create (once) ``<cache>/bundled-py<ver>-<hash>/{backends/python, pylib}``.

    The folder is keyed by the pytriton location, stub and interpreter, and is
    built in a temporary folder then renamed, so concurrent launches are safe.
    """
    stat = stub.stat()
    key = "\0".join([str(dist_dir), _pytriton_version(), str(stat.st_size), str(stat.st_mtime_ns), str(libpython)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    root = cache_dir / f"bundled-py{_python_version()}-{digest}"
    marker = root / ".complete"
    if marker.is_file():
        return root

    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir))
    try:
        shutil.copytree(
            dist_dir / "backends",
            staging / "backends",
            ignore=shutil.ignore_patterns("__pycache__", "triton_python_backend_stub"),
        )
        shutil.copy2(stub, staging / "backends" / "python" / "triton_python_backend_stub")
        if libpython is not None:
            (staging / "pylib").mkdir()
            (staging / "pylib" / libpython.name).symlink_to(libpython)
        (staging / ".complete").write_text(f"{dist_dir}\n{stub}\n{libpython}\n")
        try:
            staging.rename(root)
        except OSError:
            if not marker.is_file():  # not a lost race with another process: a real failure
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return root


def _stub_python_env() -> dict[str, str]:
    """Environment that makes a stub of this Python version see this interpreter's packages."""
    env: dict[str, str] = {}
    bin_dir = Path(sys.executable).parent
    python3 = bin_dir / "python3"
    uses_path_trick = python3.exists() and python3.resolve() == Path(sys.executable).resolve()
    if uses_path_trick:
        env["PATH"] = str(bin_dir)
    pythonpath = [] if uses_path_trick else _site_dirs()
    # A checkout used from its root (or through an editable-install import hook, which
    # PYTHONPATH-only setups would miss) is not below any site dir: add it explicitly.
    package_root = _f5_triton_root()
    if package_root is not None and package_root not in _site_dirs():
        pythonpath.append(package_root)
    if pythonpath:
        env["PYTHONPATH"] = _join_paths(pythonpath)
    return env


def _site_dirs() -> list[str]:
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return dirs


def _f5_triton_root() -> str | None:
    spec = importlib.util.find_spec("f5_triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))).resolve().parent)


def _shared_libpython() -> Path | None:
    """The running interpreter's ``libpython3.X.so.1.0``, if it is built shared.

    Putting it first on ``LD_LIBRARY_PATH`` makes the stub embed exactly this
    interpreter instead of whatever ``libpython3.X`` the system happens to have
    (or fail to start where the system has none).
    """
    soname = sysconfig.get_config_var("INSTSONAME")
    if not soname or not str(soname).startswith("libpython"):
        return None
    # Relocated builds (e.g. python-build-standalone, used by uv) report their build-time LIBDIR.
    for libdir in (sysconfig.get_config_var("LIBDIR"), os.path.join(sys.base_prefix, "lib")):
        candidate = Path(libdir or "") / str(soname)
        if libdir and candidate.is_file():
            return candidate.resolve()
    return None


def _stub_python_version(stub: Path) -> str | None:
    match = re.search(rb"libpython(3\.\d+)", stub.read_bytes())
    return match.group(1).decode() if match else None


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _pytriton_version() -> str:
    try:
        return importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _default_cache_dir() -> Path:
    if os.environ.get("F5_TRITON_CACHE"):
        return Path(os.environ["F5_TRITON_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "f5-triton"


def _join_paths(parts: Iterable[str]) -> str:
    return os.pathsep.join(p for p in parts if p)


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
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        log_verbose: int = 0,
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


@dataclass(frozen=True)
class StubReplacement:
    """One recovery by :class:`StubWatchdog`."""

    model: str
    instance: str  #: e.g. flow_matching_cpu_0_0
    dead_pid: int
    at: float  #: time.time() when the death was seen
    seconds: float  #: how long the replacement took (the new instance loaded)
    error: str | None = None  #: why it failed, or None


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

    def __init__(self, server: TritonServer, interval: float = 1.0, retry_after: float = 10.0,
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


def python_stubs(server_pid: int) -> dict[int, tuple[str, str | None]]:
    """Child processes of ``server_pid`` that are python-backend stubs: pid -> (state, model name).

    The model name is None for zombies, whose command line is gone.
    """
    stubs = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split at the last ')'
            head, tail = stat.read_text().rsplit(")", 1)
            state, ppid = tail.split()[:2]
            if int(ppid) != server_pid or not head.split("(", 1)[1].startswith("triton_python"):
                continue
            argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        model = None
        if len(argv) > 1 and argv[1].endswith(b".py"):
            model = Path(os.fsdecode(argv[1])).parents[1].name
        stubs[int(stat.parent.name)] = (state, model)
    return stubs


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


def run_forever(server: TritonServer, ready_timeout: float | None = None) -> int:
    """Start ``server`` if needed, announce readiness and serve until Ctrl-C / SIGTERM.

    Prints ``f5-triton: server ready  http=... grpc=... metrics=...`` once ready.
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
        print(f"f5-triton: server ready  http={urls.http} grpc={urls.grpc} metrics={urls.metrics}", flush=True)
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
