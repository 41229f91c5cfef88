"""Find a ``tritonserver`` installation and the environment it needs.

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
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from f5_triton.supervisor.errors import TritonNotFoundError

LOGGER = logging.getLogger(__name__)

_NGC_BINARY = Path("/opt/tritonserver/bin/tritonserver")
_PATH_LIST_VARS = frozenset({"PATH", "LD_LIBRARY_PATH", "PYTHONPATH"})
_NOT_FOUND_HINT = "pip install nvidia-pytriton or run inside an NGC tritonserver container"


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
