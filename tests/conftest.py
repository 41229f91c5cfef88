"""Shared fixtures: paths to ../shared/data, and tiny random checkpoints made by the project."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/upstream.py


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (the GPU lane runs them: scripts/gpu_lane.sh) skip where torch sees no CUDA device."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (marker gpu: the GPU lane runs it)"))


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (tests read ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def official_vocab() -> Path:
    return shared_file("vocab.txt")


@pytest.fixture(scope="session")
def ref_en() -> Path:
    return shared_file("basic_ref_en.wav")


@pytest.fixture(scope="session")
def ref_zh() -> Path:
    return shared_file("basic_ref_zh.wav")


@pytest.fixture(scope="session")
def ref_wave(ref_en):
    """basic_ref_en.wav as float32 samples (24 kHz)."""
    import soundfile as sf

    wave, rate = sf.read(ref_en, dtype="float32")
    assert rate == 24000
    return wave


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random checkpoint folder in the official layout (model.safetensors, vocab, vocos/)."""
    from f5_triton.checkpoints import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), "tiny", seed=0)


@pytest.fixture(scope="session")
def streaming_server(tiny_ckpt, tmp_path_factory):
    """tritonserver with `f5_tts` and `f5_tts_streaming` (cpu target, tiny checkpoint, nfe 4 unless a
    request says otherwise, small caches), shared by the streaming, cache and gateway tests. Its streams are not
    paced: the tests here check which stream runs with which, and pacing makes that depend on this machine's speed
    (tests/test_streaming.py tests pacing on its own scheduler and server)."""
    from f5_triton.config import PacingConfig
    from f5_triton.supervisor.server import TritonServer, free_port
    from f5_triton.repository import RepositoryOptions, render

    repo = render(RepositoryOptions(target="cpu", ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                                    vocoder=tiny_ckpt / "vocos", nfe_steps=4, queue_delay_us=1000,
                                    preprocess_instances=1, postprocess_instances=1, reference_cache_entries=8,
                                    output_cache_entries=8, output_cache_mb=64,
                                    streaming_pacing=PacingConfig(enabled=False)),
                  tmp_path_factory.mktemp("streaming_repo") / "model_repo")
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server(tiny_ckpt, tmp_path_factory):
    """Factory of real tritonservers on cpu repositories: `with tiny_server(**options) as server:`.

    `options` go to RepositoryOptions; ckpt, vocab and vocoder default to the tiny checkpoint's, and
    the streaming model is left out unless `streaming=True` (faster start). `exit_timeout_secs` and
    `log_path` go to TritonServer. Every python-backend stub runs torch on one thread: the tiny model gains
    nothing from more, and several stubs with a thread per core each slow down by orders of
    magnitude on a busy 2-core machine (OpenMP threads spinning against each other).
    """
    import contextlib
    import os

    from f5_triton.supervisor.server import TritonServer, free_port
    from f5_triton.repository import RepositoryOptions, render

    @contextlib.contextmanager
    def serve(exit_timeout_secs: int = 30, log_path=None, **options):
        options = {"ckpt": tiny_ckpt / "model.safetensors", "vocab": tiny_ckpt / "vocab.txt",
                   "vocoder": tiny_ckpt / "vocos", "streaming": False, **options}
        repo = render(RepositoryOptions(target="cpu", **options), tmp_path_factory.mktemp("repo") / "model_repo")
        with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, ready_timeout=240,
                          exit_timeout_secs=exit_timeout_secs, log_path=log_path) as server:
            yield server

    return serve


@pytest.fixture(scope="module")
def tiny_tts(tiny_ckpt):
    """The in-process pipeline of the tiny checkpoint, on one torch thread like `tiny_server`'s stubs."""
    import torch

    from f5_triton.pipeline import TTS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TTS.from_paths(tiny_ckpt / "model.safetensors", tiny_ckpt / "vocab.txt", tiny_ckpt / "vocos")
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def metric_samples():
    """`metric_samples(server, prefix)` -> {(name, sorted label items): value} from Triton's /metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def read(server, prefix: str) -> dict[tuple, float]:
        with urllib.request.urlopen(server.urls.metrics, timeout=10) as response:
            exposition = response.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(exposition) for s in family.samples
                if s.name.startswith(prefix)}

    return read


@pytest.fixture(scope="module")
def dit(tiny_ckpt):
    """The tiny checkpoint's DiT, loaded by the real loader (CPU, fp32)."""
    from f5_triton.checkpoints import load_dit
    from f5_triton.text import Tokenizer

    return load_dit(tiny_ckpt / "model.safetensors", Tokenizer(tiny_ckpt / "vocab.txt").vocab_size)


@pytest.fixture(scope="module")
def decoder(tiny_ckpt):
    """The tiny checkpoint's Vocos as the exportable decoder."""
    from f5_triton.vocoder import VocosDecoder, load_vocos

    return VocosDecoder(load_vocos(tiny_ckpt / "vocos")).eval()


@pytest.fixture(scope="session")
def run_gateway():
    """`with run_gateway(config) as url:` the gateway app of a GatewayConfig, served by uvicorn on a free port."""
    import contextlib
    import threading
    import time

    @contextlib.contextmanager
    def run(config):
        import uvicorn

        from f5_triton.gateway import create_app
        from f5_triton.supervisor.server import free_port

        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(10)

    return run


def rendered_document(repo: Path, model: str) -> str:
    """The serving document (JSON) of `model` in a rendered repository: its config.pbtxt parsed as tritonserver
    parses it (protobuf text format)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from f5_triton.config import SERVING_DOCUMENT

    config = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert SERVING_DOCUMENT in config.parameters, f"{model}: no {SERVING_DOCUMENT} parameter"
    return config.parameters[SERVING_DOCUMENT].string_value


def rendered_settings(repo: Path, model: str, **kind):
    """The typed settings (`config.ServingSettings`, or `kind=` a subclass) `model` of a rendered repository reads
    at load."""
    from f5_triton.config import load_serving_document

    return load_serving_document(rendered_document(repo, model), **kind)
