"""Proof tests for f5_triton.supervisor against a real tritonserver (no mocks).

A tiny model repository is built in a temporary folder: a python-backend model
``double`` (dynamic batching, ragged inputs, imports ``f5_triton`` inside the
stub), a plain ``add_one`` and an ensemble ``pipeline`` = add_one(double(x)).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from f5_triton.supervisor import install as install_module
from f5_triton.supervisor.errors import TritonNotFoundError, TritonServerError
from f5_triton.supervisor.install import TritonInstall, find_tritonserver
from f5_triton.supervisor.server import TritonServer, free_port

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]

if importlib.util.find_spec("pytriton") is None and shutil.which("tritonserver") is None:
    pytest.skip("needs nvidia-pytriton or a tritonserver on PATH", allow_module_level=True)

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

DOUBLE_CONFIG = """
name: "double"
backend: "python"
max_batch_size: 8
dynamic_batching { max_queue_delay_microseconds: 200000 }
input [{ name: "X", data_type: TYPE_FP32, dims: [ -1 ], allow_ragged_batch: true }]
output [{ name: "Y", data_type: TYPE_FP32, dims: [ -1 ] }]
instance_group [{ count: 1, kind: KIND_CPU }]
"""

# Runs inside the python backend stub: importing f5_triton proves the stub sees this environment.
DOUBLE_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils

import f5_triton


class TritonPythonModel:
    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "X").as_numpy() for r in requests]
        # One computation for the whole (ragged) batch, then split back per request.
        flat = np.concatenate([x.reshape(-1) for x in xs]) * np.float32(2)
        bounds = np.cumsum([x.size for x in xs])[:-1]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", y.reshape(x.shape).astype(np.float32))])
            for x, y in zip(xs, np.split(flat, bounds))
        ]
'''

ADD_ONE_CONFIG = """
name: "add_one"
backend: "python"
max_batch_size: 8
input [{ name: "X", data_type: TYPE_FP32, dims: [ -1 ] }]
output [{ name: "Y", data_type: TYPE_FP32, dims: [ -1 ] }]
instance_group [{ count: 1, kind: KIND_CPU }]
"""

ADD_ONE_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", (x + 1).astype(np.float32))]))
        return out
'''

PIPELINE_CONFIG = """
name: "pipeline"
platform: "ensemble"
max_batch_size: 8
input [{ name: "INPUT", data_type: TYPE_FP32, dims: [ -1 ] }]
output [{ name: "OUTPUT", data_type: TYPE_FP32, dims: [ -1 ] }]
ensemble_scheduling {
  step [
    {
      model_name: "double"
      model_version: -1
      input_map { key: "X" value: "INPUT" }
      output_map { key: "Y" value: "doubled" }
    },
    {
      model_name: "add_one"
      model_version: -1
      input_map { key: "X" value: "doubled" }
      output_map { key: "Y" value: "OUTPUT" }
    }
  ]
}
"""


def _write_model(repo: Path, name: str, config: str, model_py: str | None) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
    if model_py is not None:
        (repo / name / "1" / "model.py").write_text(textwrap.dedent(model_py))


def _server(repo: Path, install: TritonInstall, log_dir: Path, **kwargs: object) -> TritonServer:
    """A server on free local ports, logging into the test's temporary folder."""
    ports = {"http_port": free_port(), "grpc_port": free_port(), "metrics_port": free_port()}
    return TritonServer(
        repo, install=install, bind_address="127.0.0.1", log_path=log_dir / "tritonserver.log", **{**ports, **kwargs}
    )


def _group_members(pgid: int, wait: float = 0.0) -> list[int]:
    """Live (non-zombie) processes of a process group, polled for up to ``wait`` seconds until none."""
    deadline = time.monotonic() + wait
    while True:
        members = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after the last ')'.
                state, _ppid, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
            except OSError:
                continue
            if int(pgrp) == pgid and state != "Z":
                members.append(int(stat.parent.name))
        if not members or time.monotonic() >= deadline:
            return members
        time.sleep(0.05)


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> TritonInstall:
    # A fresh cache folder, so the bundled backend directory is really assembled by this run.
    return find_tritonserver(cache_dir=tmp_path_factory.mktemp("f5-triton-cache"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, install: TritonInstall) -> Iterator[TritonServer]:
    repo = tmp_path_factory.mktemp("model_repo")
    _write_model(repo, "double", DOUBLE_CONFIG, DOUBLE_MODEL)
    _write_model(repo, "add_one", ADD_ONE_CONFIG, ADD_ONE_MODEL)
    _write_model(repo, "pipeline", PIPELINE_CONFIG, None)
    with _server(repo, install, repo.parent, ready_timeout=60) as srv:
        yield srv


def test_find_tritonserver_prepares_bundled_backend(install: TritonInstall) -> None:
    assert install.binary.is_file()
    if install.bundled:
        assert install.backend_directory is not None
        stub = install.backend_directory / "python" / "triton_python_backend_stub"
        assert stub.is_file() and os.access(stub, os.X_OK)
        assert (install.backend_directory / "python" / "libtriton_python.so").is_file()
        assert "nvidia_pytriton.libs" in install.env["LD_LIBRARY_PATH"]
        # Preparing again reuses the same folder.
        again = find_tritonserver(cache_dir=install.backend_directory.parent.parent, prefer="bundled")
        assert again.backend_directory == install.backend_directory


def test_not_found_error_names_the_fixes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(install_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(install_module, "_NGC_BINARY", tmp_path / "no-tritonserver")
    monkeypatch.setattr(install_module, "_bundled_install", lambda cache_dir: None)
    with pytest.raises(TritonNotFoundError, match="pip install nvidia-pytriton or run inside an NGC") as err:
        find_tritonserver(cache_dir=tmp_path)
    assert isinstance(err.value, RuntimeError)


# Clients are always closed: tritonserver's graceful shutdown waits (up to
# --exit-timeout-secs) for idle HTTP keep-alive connections to go away.


def test_server_is_ready(server: TritonServer) -> None:
    assert server.is_running()
    assert server.log_path is not None and server.log_path.is_file()
    with httpclient.InferenceServerClient(server.urls.http_hostport) as client:
        assert client.is_server_ready()
        for name in ("double", "add_one", "pipeline"):
            assert client.is_model_ready(name)
    # Metrics are served on their own port.
    with urllib.request.urlopen(server.urls.metrics, timeout=5) as response:
        assert b"nv_inference_count" in response.read()


def test_http_and_grpc_inference(server: TritonServer) -> None:
    x = np.arange(5, dtype=np.float32)[None, :]

    with httpclient.InferenceServerClient(server.urls.http_hostport) as http:
        inp = httpclient.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = http.infer("double", [inp], outputs=[httpclient.InferRequestedOutput("Y")])
        np.testing.assert_array_equal(result.as_numpy("Y"), 2 * x)

        hinp = httpclient.InferInput("INPUT", list(x.shape), "FP32")
        hinp.set_data_from_numpy(x)
        np.testing.assert_array_equal(http.infer("pipeline", [hinp]).as_numpy("OUTPUT"), 2 * x + 1)

    with grpcclient.InferenceServerClient(server.urls.grpc) as grpc:
        ginp = grpcclient.InferInput("INPUT", list(x.shape), "FP32")
        ginp.set_data_from_numpy(x)
        result = grpc.infer("pipeline", [ginp])
        np.testing.assert_array_equal(result.as_numpy("OUTPUT"), 2 * x + 1)


def _double_counts(client: grpcclient.InferenceServerClient) -> tuple[int, int]:
    stats = client.get_inference_statistics("double", as_json=True)["model_stats"][0]
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def test_concurrent_ragged_requests_are_batched(server: TritonServer) -> None:
    n = 16
    barrier = threading.Barrier(n)
    with grpcclient.InferenceServerClient(server.urls.grpc) as client:

        def call(length: int) -> np.ndarray:
            x = np.linspace(-1, 1, length, dtype=np.float32)[None, :]
            inp = grpcclient.InferInput("X", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            barrier.wait()  # all 16 requests land inside one 200 ms queue window
            y = client.infer("double", [inp]).as_numpy("Y")
            np.testing.assert_allclose(y, 2 * x)
            return y

        inferences_before, executions_before = _double_counts(client)
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(call, range(1, n + 1)))
        inferences_after, executions_after = _double_counts(client)

    assert [r.shape for r in results] == [(1, length) for length in range(1, n + 1)]
    inferences, executions = inferences_after - inferences_before, executions_after - executions_before
    assert inferences == n
    assert executions < inferences, f"no dynamic batching: {executions} executions for {inferences} requests"


def test_restricted_apis_need_the_admin_key(server: TritonServer) -> None:
    with httpclient.InferenceServerClient(server.urls.http_hostport) as http:
        with pytest.raises(InferenceServerException, match="restricted"):
            http.get_model_repository_index()
        names = {m["name"] for m in http.get_model_repository_index(headers=server.admin_headers)}
        assert {"double", "add_one", "pipeline"} <= names
        with pytest.raises(InferenceServerException, match="restricted"):
            http.update_log_settings({"log_verbose_level": 1})
        http.get_inference_statistics("double")  # statistics stay open

    with grpcclient.InferenceServerClient(server.urls.grpc) as grpc:
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.get_system_shared_memory_status()
        with pytest.raises(InferenceServerException, match="restricted"):
            grpc.get_system_shared_memory_status(headers=server.admin_headers)  # HTTP spelling
        grpc.get_system_shared_memory_status(headers=server.grpc_admin_headers)


def test_stop_terminates_the_process(tmp_path: Path, install: TritonInstall) -> None:
    (tmp_path / "repo").mkdir()
    srv = _server(tmp_path / "repo", install, tmp_path)
    assert srv.stop() is None  # never started: a no-op
    srv.start()
    srv.wait_ready(timeout=30)
    pid = srv.pid
    assert pid is not None
    code = srv.stop()
    assert code is not None and not srv.is_running()
    assert srv.stop() == code  # idempotent
    assert _group_members(pid, wait=5.0) == []  # neither the server nor any stub of its group is left
    # The ports are free again.
    srv2 = _server(
        tmp_path / "repo", install, tmp_path, http_port=srv.http_port, grpc_port=srv.grpc_port, metrics_port=srv.metrics_port
    )
    with srv2:
        assert srv2.is_running()
    assert not srv2.is_running()



def test_kill_reaps_stubs_and_shared_memory(tmp_path: Path, install: TritonInstall) -> None:
    repo = tmp_path / "repo"
    _write_model(repo, "add_one", ADD_ONE_CONFIG, ADD_ONE_MODEL)
    srv = _server(repo, install, tmp_path)
    with srv:
        pid = srv.pid
        assert pid is not None
        assert len(_group_members(pid)) >= 2  # the server and the add_one stub
        regions = list(Path("/dev/shm").glob(f"{srv.shm_region_prefix}*"))
        assert regions, "python backend did not use the per-server shm prefix"
        srv.kill()
        assert not srv.is_running()
        assert _group_members(pid, wait=5.0) == []
        assert not [r for r in regions if r.exists()]


def test_missing_repository_fails_fast_with_log_tail(tmp_path: Path, install: TritonInstall) -> None:
    srv = _server(tmp_path / "does-not-exist", install, tmp_path)
    started = time.monotonic()
    with pytest.raises(TritonServerError) as err:
        with srv:
            pass
    assert time.monotonic() - started < 30
    message = str(err.value)
    assert "exited with status" in message
    assert "failed to stat" in message and "does-not-exist" in message  # from the server log
    assert not srv.is_running()


@pytest.mark.parametrize("host", [None, "0.0.0.0"])
def test_serve_listens_where_asked_and_stops_on_sigterm(tmp_path: Path, host: str | None) -> None:
    """`f5-triton serve` binds Triton's ports to 127.0.0.1 unless F5_TRITON_HOST (or --host) says otherwise, its
    ready line names the real address, and SIGTERM stops it. Its ports come from flags, or from the environment
    names run.sh and the image use (HTTP_PORT, GRPC_PORT, METRICS_PORT)."""
    psutil = pytest.importorskip("psutil")
    (tmp_path / "repo").mkdir()
    ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
    env = {k: v for k, v in os.environ.items() if k not in ("F5_TRITON_HOST", "HTTP_PORT", "GRPC_PORT", "METRICS_PORT")}
    port_flags = [arg for name, port in ports.items() for arg in (f"--{name}-port", str(port))]
    if host:
        env["F5_TRITON_HOST"] = host
        env.update({f"{name.upper()}_PORT": str(port) for name, port in ports.items()})
        port_flags = []
    pid_file = tmp_path / "server.pid"
    proc = subprocess.Popen([sys.executable, "-m", "f5_triton.cli", "serve", "--model-repo", str(tmp_path / "repo"),
                             *port_flags, "--log-file", str(tmp_path / "tritonserver.log"), "--ready-timeout", "30",
                             "--pid-file", str(pid_file)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        address = host or "127.0.0.1"
        assert ready.startswith(f"f5-triton: server ready  http=http://127.0.0.1:{ports['http']} "), ready
        assert f"grpc=127.0.0.1:{ports['grpc']}" in ready and "metrics=http://" in ready
        assert ready.rstrip().endswith(f"(listening on {address}{', all interfaces' if host else ''})"), ready
        # gRPC binds 127.0.0.1 as IPv6-mapped ::ffff:127.0.0.1, and 0.0.0.0 as :: (every interface, both families)
        listening = {c.laddr.port: {"::": "0.0.0.0"}.get(ip, ip) for c in psutil.net_connections("tcp")
                     if c.status == "LISTEN" and (ip := c.laddr.ip.removeprefix("::ffff:"))}
        assert {port: listening.get(port) for port in ports.values()} == {port: address for port in ports.values()}
        (server_pid,) = [c.pid for c in psutil.Process(proc.pid).children()]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _group_members(server_pid, wait=5.0) == []
