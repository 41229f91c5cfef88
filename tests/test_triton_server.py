"""The real tritonserver with the rendered repository (cpu target, tiny random checkpoint)."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from f5_triton.request import validate_request
from f5_triton.repository import RepositoryOptions, render

pytestmark = pytest.mark.server

REF_TEXT = "Some call me nature, others call me mother nature."
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> Path:
    """Where the server's stubs leave a file each when they import soundfile from PYTHONPATH (SHADOW_SOUNDFILE)."""
    return tmp_path_factory.mktemp("probes")


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory, probes):
    """The module's server; a shadow soundfile (a probe, then the real one) is first on its stubs' PYTHONPATH."""
    import os

    from f5_triton.supervisor.server import TritonServer, free_port

    shadow = tmp_path_factory.mktemp("shadow")
    (shadow / "soundfile.py").write_text(SHADOW_SOUNDFILE)
    pythonpath = os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")]))
    repo = render(RepositoryOptions(target="cpu", ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                                    vocoder=tiny_ckpt / "vocos", nfe_steps=4, max_batch_size=8,
                                    preferred_batch_sizes=[8], queue_delay_us=300_000, preprocess_instances=1,
                                    postprocess_instances=1,
                                    dit_compile=True),  # ignored on a CPU, with a log line (test_package_log_...)
                  tmp_path_factory.mktemp("repo") / "model_repo")
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                      env={**os.environ, "PYTHONPATH": pythonpath, "F5_PROBE_DIR": str(probes)}) as srv:
        srv.wait_ready(240)
        yield srv


@pytest.fixture(scope="module")
def tts(tiny_ckpt):
    from f5_triton.pipeline import TTS

    return TTS.from_paths(tiny_ckpt / "model.safetensors", tiny_ckpt / "vocab.txt", tiny_ckpt / "vocos")


def infer(module, url, wave, ref_text, target_text, **extra):
    from f5_triton.client import synthesize

    return synthesize(url, wave, ref_text, target_text, protocol=module.__name__.rsplit(".", 1)[1], **extra)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_result_equals_in_process_pipeline(server, tts, ref_wave, protocol):
    import tritonclient.grpc
    import tritonclient.http

    module = tritonclient.http if protocol == "http" else tritonclient.grpc
    url = server.urls.http_hostport if protocol == "http" else server.urls.grpc
    text = "I don't really care what you call me."
    got = infer(module, url, ref_wave, REF_TEXT, text, seed=42, nfe_steps=4, speed=1.1)
    expected = tts.synthesize([validate_request(ref_wave, REF_TEXT, text, seed=42, nfe_steps=4, speed=1.1)])[0]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def test_long_text_in_several_chunks(server, tts, ref_wave):
    import tritonclient.grpc

    text = "This sentence is long enough to need its own chunk of audio, and then some more words. " * 5
    request = validate_request(ref_wave, REF_TEXT, text, seed=3, nfe_steps=4)
    assert len(tts.preprocess(request).jobs) > 1
    got = infer(tritonclient.grpc, server.urls.grpc, ref_wave, REF_TEXT, text, seed=3)  # nfe default 4 (repo)
    expected = tts.synthesize([request])[0]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def test_16_concurrent_requests_are_batched(server, ref_wave):
    import tritonclient.grpc
    import tritonclient.http

    def stats():
        with tritonclient.http.InferenceServerClient(server.urls.http_hostport) as client:
            s = client.get_inference_statistics("flow_matching")["model_stats"][0]
            return s["inference_count"], s["execution_count"]

    before = stats()
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen".split()
    texts = [" ".join(words[: i + 1]) + "." for i in range(16)]
    waves = [ref_wave[: len(ref_wave) - 2400 * i] for i in range(16)]  # ragged references too
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: infer(tritonclient.grpc, server.urls.grpc, waves[i], REF_TEXT, texts[i],
                                                seed=i), range(16)))
    assert all(len(r) > 0 and np.isfinite(r).all() for r in results)
    after = stats()
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 16
    assert executions < inferences  # dynamic batching really batched requests of different lengths


@pytest.mark.parametrize("client", ["client_http.py", "client_grpc.py"])
def test_upstream_clients_work_unchanged(server, ref_en, tmp_path, client):
    """Upstream F5-TTS's own Triton clients (pinned f5-tts==1.1.22) against our server."""
    import upstream

    script = Path(upstream.package_root()) / "runtime" / "triton_trtllm" / client
    args = [sys.executable, str(script), "--reference-audio", str(ref_en), "--reference-text", REF_TEXT,
            "--target-text", "Upstream clients work without changes."]
    if client == "client_http.py":
        out = tmp_path / "out" / "http.wav"
        args += ["--server-url", server.urls.http_hostport, "--output-audio", str(out)]
    else:
        out = tmp_path / "log" / "test.wav"
        port = server.urls.grpc.rsplit(":", 1)[1]
        args += ["--server-addr", "127.0.0.1", "--server-port", port, "--log-dir", str(tmp_path / "log")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    wave, rate = sf.read(out)
    assert rate == 24000 and len(wave) > 24000 * 0.5


def test_our_clients(server, ref_en, tmp_path):
    for script, url in (("client_http.py", server.urls.http_hostport), ("client_grpc.py", server.urls.grpc)):
        out = tmp_path / f"{script}.wav"
        result = subprocess.run(
            [sys.executable, str(REPO_ROOT / script), "--server-url", url, "--reference-audio", str(ref_en),
             "--reference-text", REF_TEXT, "--target-text", "Our own client.", "--seed", "5", "--nfe-steps", "4",
             "--output-audio", str(out)], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        wave, rate = sf.read(out)
        assert rate == 24000 and len(wave) > 0


def test_benchmark_server_mode(server, tmp_path):
    import json

    out_json = tmp_path / "server.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmark.py"), "--mode", "server", "--server-url", server.urls.grpc,
         "--concurrency", "1,2", "--num-requests", "4", "--nfe", "2", "--output-json", str(out_json),
         "--plot", str(tmp_path / "sweep.png")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert all(r["rtf"] > 0 and r["audio_seconds"] > 0 for r in rows)
    assert "flow_matching" in rows[0]["stage_seconds"]  # per-model compute time from Triton's statistics
    assert (tmp_path / "sweep.png").stat().st_size > 1000


SHADOW_SOUNDFILE = '''
import os, sys, importlib
# a probe: record which stub imported us, then hand over to the real soundfile
open(os.path.join(os.environ["F5_PROBE_DIR"], str(os.getpid())), "w").close()
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
del sys.modules["soundfile"]
sys.modules["soundfile"] = importlib.import_module("soundfile")
'''


def test_stubs_see_packages_that_are_only_on_pythonpath(server, probes):
    """The python-backend stub runs an isolated interpreter that ignores PYTHONPATH; the adapters restore it.

    Found on the GPU machine, where wheels are installed with `pip --target` onto PYTHONPATH: every model
    failed to load with "No module named 'soundfile'". A shadow soundfile on the module server's PYTHONPATH
    proves the stubs import from there (and, by the same order, take PYTHONPATH's numpy over the image's).
    """
    stubs = len(list(probes.iterdir()))
    # preprocess, flow_matching, postprocess and vocoder each import f5_triton.audio (a stub per instance)
    assert stubs >= 4, f"only {stubs} stub(s) imported soundfile from PYTHONPATH"


def test_package_log_records_reach_the_triton_log(server):
    """Engine messages (here: compile asked for on a CPU) land in the server's log, not in a stub's lost stderr."""
    log = server.log_path.read_text()
    assert "f5_triton.engines.torch_engine: dit_step: torch compile / CUDA graphs need a CUDA device" in log, log[-2000:]
