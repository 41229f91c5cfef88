"""The GPU-target Triton server: rendered by the project (`--target gpu`: KIND_GPU instances, fp16, compile, CUDA
graphs captured at warm-up, FA4), started by the project's supervisor, answering gRPC, HTTP and streaming requests
within `benchmarks.bench.FP16_WAVE_REL_L2` of the in-process fp32 pipeline on the same seeds; a killed flow_matching
stub is replaced and serves again; then (`-k soak`) GPU_SOAK_SECONDS (default 300) of mixed traffic with no failure
and flat memory. Marker `gpu`: the GPU lane runs it (scripts/gpu_lane.sh server, soak).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from benchmarks import bench, soak
from f5_triton.config import SAMPLE_RATE
from test_gpu_lane import ARCH, NFE, checkpoint, record, repository_options  # noqa: F401  (checkpoint: fixture)

pytestmark = pytest.mark.gpu
# The soak's memory bounds, growth from the end of its first minute (soak.SETTLE_S) to its end: RSS of all the
# server's processes together (caches are bounded; allocator noise is a few MiB of ~10 GiB) and used GPU memory
# (warm-up captured every graph, so torch's caching allocator has its pools; anything more is a leak).
SOAK_MAX_RSS_GROWTH = 0.05
SOAK_MAX_GPU_GROWTH = 0.02


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):  # noqa: F811
    from f5_triton.repository import render
    from f5_triton.supervisor.server import TritonServer, free_port

    repo = render(repository_options(checkpoint, max_batch_size=16, preferred_batch_sizes=[8, 16]),
                  tmp_path_factory.mktemp("gpu_server") / "model_repo")
    env = dict(os.environ)
    if os.environ.get("NUMPY1_SITE"):  # Triton 2.51's stubs need numpy < 2 (scripts/prepare_gpu_wheels.sh)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ["NUMPY1_SITE"], os.environ.get("PYTHONPATH")]))
    start = time.monotonic()
    with TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(), env=env,
                      ready_timeout=480, log_path=tmp_path_factory.mktemp("gpu_log") / "tritonserver.log") as srv:
        record(server_ready_s=time.monotonic() - start, server_gpu_used_mib_at_ready=gpu_used_mib())
        yield srv


def gpu_used_mib() -> float:
    import pynvml

    pynvml.nvmlInit()
    return pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20


@pytest.fixture(scope="module")
def pipeline(checkpoint):  # noqa: F811
    """The in-process pipeline, fp32 eager on the GPU (no TF32)."""
    import torch

    from f5_triton.pipeline import TTS

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    return TTS.from_paths(checkpoint / "model.safetensors", checkpoint / "vocab.txt", checkpoint / "vocos",
                          arch=ARCH, device="cuda")


def check_answers(server, pipeline) -> dict[str, float]:
    from f5_triton.client import stream_synthesize, synthesize
    from f5_triton.request import validate_request
    from f5_triton.streaming import StreamingSynthesizer
    from f5_triton.text import StreamingChunker

    items = bench.mixed_items(3)
    worst = {}
    for seed, (item, protocol) in enumerate(zip(items, ("grpc", "http", "stream"))):
        fields = dict(sample_rate=item.sample_rate, nfe_steps=NFE, seed=seed)
        request = validate_request(item.wave, item.reference_text, item.target_text, **fields)
        if protocol == "stream":
            got = np.concatenate(list(stream_synthesize(server.urls.grpc, item.wave, item.reference_text,
                                                        item.target_text, timeout=300, **fields)))
            streamer = StreamingSynthesizer(pipeline.stages(StreamingChunker()))
            expected = np.concatenate([piece.audio for piece in streamer.stream(request)])
        else:
            url = server.urls.grpc if protocol == "grpc" else server.urls.http_hostport
            got = synthesize(url, item.wave, item.reference_text, item.target_text, protocol=protocol, timeout=300,
                             **fields)
            (expected,) = pipeline.synthesize([request])
        assert len(got) == len(expected), (protocol, len(got), len(expected))
        worst[protocol] = bench.rel_l2(got, expected)
        assert worst[protocol] <= bench.FP16_WAVE_REL_L2, (protocol, worst[protocol])
    return worst


def test_gpu_server_answers_like_the_pipeline_and_recovers_a_killed_stub(server, pipeline):
    record(server_rel_l2=check_answers(server, pipeline))
    dead = soak.kill_flow_stub(server.pid)
    start = time.monotonic()
    while not server.stub_replacements:
        assert time.monotonic() - start < 480, "the killed flow_matching stub was not replaced in 8 minutes"
        time.sleep(1)
    (replacement,) = server.stub_replacements
    assert (replacement.model, replacement.dead_pid, replacement.error) == ("flow_matching", dead, None)
    record(server_stub_recovery_s=time.monotonic() - start, server_rel_l2_after_kill=check_answers(server, pipeline))


def test_gpu_soak(server):
    seconds = float(os.environ.get("GPU_SOAK_SECONDS", "300"))
    items = soak.mixed_items(bench.synthetic_reference(5.0), SAMPLE_RATE)
    report = soak.soak(server.urls.grpc, server.pid, items, seconds, concurrency=16, nfe_steps=NFE)
    if os.environ.get("GPU_LANE_OUT"):
        report.write(os.path.join(os.environ["GPU_LANE_OUT"], "soak.json"),
                     os.path.join(os.environ["GPU_LANE_OUT"], "soak.png"))
    rss, gpu = report.growth().get("total"), report.growth("gpu_used_mib").get("gpu0")
    record(soak_seconds=report.seconds, soak_requests=len(report.outcomes), soak_failures=len(report.failures),
           soak_rss_growth=rss, soak_gpu_growth=gpu, soak_p50_s=report.summary()["p50_s"])
    assert not report.failures, report.summary()["errors"]
    assert rss is not None and rss <= SOAK_MAX_RSS_GROWTH, report.growth()
    assert gpu is not None and gpu <= SOAK_MAX_GPU_GROWTH, report.growth("gpu_used_mib")
