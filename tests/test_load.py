"""Load against the real tritonserver (cpu target, tiny checkpoint): 300 requests at concurrency 24
over HTTP and gRPC with no failure and every response matched to its request, and a burst beyond
the queue limit that is refused cleanly while the admitted requests are served."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time

import numpy as np
import pytest

from f5_triton.client import build_inputs, protocol_module
from f5_triton.config import HOP_LENGTH, SAMPLE_RATE
from f5_triton.request import validate_request

pytestmark = pytest.mark.server

REF_TEXT = "Some call me nature, others call me mother nature."
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()
REQUESTS, CONCURRENCY = 300, 24
MAX_QUEUE_SIZE = 32


@pytest.fixture(scope="module")
def server(tiny_server):
    with tiny_server(nfe_steps=1, max_batch_size=8, preferred_batch_sizes=[8], queue_delay_us=20_000,
                     max_queue_size=MAX_QUEUE_SIZE, preprocess_instances=2, postprocess_instances=2) as srv:
        yield srv


def request_args(ref_wave: np.ndarray, i: int) -> dict:
    """Request i: its own reference length, text, seed and ODE steps, so its audio is its own."""
    seconds = 1.0 + (i % 7) * 0.25
    words = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 5))
    return {"wave": ref_wave[: int(seconds * SAMPLE_RATE)], "reference_text": REF_TEXT,
            "target_text": f"Request {i}, {words}.", "seed": 1000 + i, "nfe_steps": 1 + i % 2}


def validated(args: dict):
    return validate_request(args["wave"], args["reference_text"], args["target_text"], seed=args["seed"],
                            nfe_steps=args["nfe_steps"])


def expected_samples(tts, args: dict) -> int:
    """Output length of a one-chunk request: Vocos' (generated frames - 1) * hop."""
    (job,) = tts.preprocess(validated(args)).jobs
    return (job.total_frames - job.ref_frames - 1) * HOP_LENGTH


class Clients(threading.local):
    """One HTTP and one gRPC connection per thread."""

    def __init__(self, server):
        self.clients = {"http": protocol_module("http").InferenceServerClient(server.urls.http_hostport),
                        "grpc": protocol_module("grpc").InferenceServerClient(server.urls.grpc)}


def send(clients: Clients, protocol: str, args: dict) -> np.ndarray:
    module = protocol_module(protocol)
    inputs = build_inputs(module, args["wave"], args["reference_text"], args["target_text"], seed=args["seed"],
                          nfe_steps=args["nfe_steps"])
    result = clients.clients[protocol].infer("f5_tts", inputs, outputs=[module.InferRequestedOutput("waveform")])
    return result.as_numpy("waveform").reshape(-1)


def test_300_requests_at_concurrency_24_all_answered_and_matched(server, tiny_tts, ref_wave):
    requests = [request_args(ref_wave, i) for i in range(REQUESTS)]
    lengths = [expected_samples(tiny_tts, args) for args in requests]
    assert len(set(lengths)) > 20  # lengths tell most responses apart
    clients = Clients(server)
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(send, clients, "grpc" if i % 2 else "http", args) for i, args in enumerate(requests)]
        results = [f.result() for f in futures]  # any failure raises here
    elapsed = time.monotonic() - start
    wrong = [i for i, (wave, n) in enumerate(zip(results, lengths)) if len(wave) != n or not np.isfinite(wave).all()]
    assert not wrong, f"responses {wrong[:10]} do not fit their requests"
    # a sample, against the same requests in process: each response is its own request's audio
    for i in range(0, REQUESTS, 25):
        expected = tiny_tts.synthesize([validated(requests[i])])[0]
        np.testing.assert_allclose(results[i], expected, atol=1e-4, rtol=0, err_msg=f"request {i}")
    print(f"{REQUESTS} requests in {elapsed:.1f} s ({REQUESTS / elapsed:.1f} req/s)")


def test_a_burst_beyond_the_queue_limit_is_refused_cleanly(server, tiny_tts, ref_wave):
    import tritonclient.grpc

    burst = 4 * MAX_QUEUE_SIZE
    # a full reference and 8 ODE steps: slow enough for the queues to fill up
    args = {**request_args(ref_wave, 3), "wave": ref_wave, "nfe_steps": 8}
    length = expected_samples(tiny_tts, args)
    answers: queue.Queue = queue.Queue()
    with tritonclient.grpc.InferenceServerClient(server.urls.grpc) as client:
        inputs = build_inputs(tritonclient.grpc, args["wave"], args["reference_text"], args["target_text"],
                              seed=args["seed"], nfe_steps=args["nfe_steps"])
        for _ in range(burst):
            client.async_infer("f5_tts", inputs, callback=lambda result, error: answers.put((result, error)))
        outcomes = [answers.get(timeout=300) for _ in range(burst)]
    served = [r.as_numpy("waveform").reshape(-1) for r, e in outcomes if e is None]
    refused = [e for r, e in outcomes if e is not None]
    assert refused and served, (len(refused), len(served))
    print(f"burst of {burst}: {len(served)} served, {len(refused)} refused")
    for error in refused:  # Triton's own queue policy: UNAVAILABLE, never a crash or a hang
        assert error.status() == "StatusCode.UNAVAILABLE" and "Exceeds maximum queue size" in error.message(), error
    # the gateway names the limit (503: clients retry later)
    from f5_triton.gateway.backend import TritonBackend, api_error

    backend = TritonBackend(server.urls.grpc)
    try:
        error = api_error(refused[0], backend.queue_limit())
    finally:
        backend.close()
    assert error.status == 503 and f"queue limit of {MAX_QUEUE_SIZE} requests (max_queue_size)" in error.message
    assert all(len(wave) == length for wave in served)
    for wave in served:  # the same request (seed included) in different batches: the same audio
        np.testing.assert_allclose(wave, served[0], atol=1e-4, rtol=0)
    # the server is fine afterwards
    np.testing.assert_allclose(send(Clients(server), "http", args), served[0], atol=1e-4, rtol=0)


# CI's short soak on a server already warm from the tests above: the first half settles (reference cache,
# allocator), the second must stay flat. scripts/soak.py runs it for minutes, settling for the first one.
SOAK_SECONDS, SETTLE_SECONDS = 60, 30


def test_a_short_soak_has_no_failures_and_flat_memory(server, ref_wave, tmp_path):
    from benchmarks import soak

    items = soak.mixed_items(ref_wave, SAMPLE_RATE)
    report = soak.soak(server.urls.grpc, server.pid, items, SOAK_SECONDS, concurrency=4, memory_interval=5.0)
    report.write(tmp_path / "soak.json", tmp_path / "soak.png")
    summary = report.summary()
    growth = report.growth(settle_s=SETTLE_SECONDS)
    print({k: summary[k] for k in ("requests", "failures", "p50_s", "p99_s")}, growth)
    assert not report.failures, summary["errors"]
    starts = [o.start for o in report.outcomes]
    assert min(starts) < SETTLE_SECONDS <= max(starts)  # load before and after the settling point
    assert {"tritonserver", "flow_matching_cpu_0_0", "preprocess_0_0", "total"} <= set(growth)
    assert growth["total"] <= 0.10, growth  # the server with all its model processes
    # each process: a looser bound (new batch shapes still raise allocator high-water marks, seen up to 12 %
    # on the vocoder and tritonserver in 150 s), enough to catch a per-request leak
    assert max(growth.values()) <= 0.20, growth
    assert (tmp_path / "soak.png").stat().st_size > 0
