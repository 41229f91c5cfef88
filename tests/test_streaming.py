"""Streaming: cross-faded pieces, in process and through the decoupled Triton model `f5_tts_streaming`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from f5_triton import audio, text
from f5_triton.pipeline import TTS, finish
from f5_triton.request import validate_request
from f5_triton.streaming import CrossFadeStream, StreamingSynthesizer, time_to_first_audio

REF_TEXT = "Some call me nature, others call me mother nature."
LONG_TEXT = ("Hello there. This streaming test speaks several sentences, one chunk after another, and each "
             "of them is sent as soon as it is ready. The joins between the chunks are cross-faded, so nobody "
             "hears a click. Then the final chunk closes the stream.")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tts(tiny_ckpt):
    return TTS.from_paths(tiny_ckpt / "model.safetensors", tiny_ckpt / "vocab.txt", tiny_ckpt / "vocos")


@pytest.fixture(scope="module")
def streamer(tts):
    return StreamingSynthesizer(tts.preprocess, tts.flow_matching, tts.vocoder)


@pytest.fixture(scope="module")
def ref_wave(ref_en):
    wave, _ = sf.read(ref_en, dtype="float32")
    return wave


def chunk_waves(tts, prepared):
    """Each chunk generated alone (batch of one), as the streaming model does."""
    return [tts.vocoder(tts.flow_matching([job]))[0] for job in prepared.jobs]


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize("seconds", [0.15, 0.01, 0.0])
def test_cross_fade_stream_equals_cross_fade(seconds):
    rng = np.random.default_rng(0)
    fade = int(seconds * 24000)
    for _ in range(40):
        # lengths around the fade: shorter chunks, empty chunks, a short first chunk
        lengths = rng.choice([0, 1, fade // 2, fade, fade + 1, 3 * fade + 7, 9000], size=rng.integers(1, 6))
        waves = [rng.standard_normal(int(n)).astype(np.float32) for n in lengths]
        stream = CrossFadeStream(seconds)
        pieces = [stream.push(w) for w in waves] + [stream.flush()]
        expected = audio.cross_fade(waves, seconds) if len(waves) > 1 else waves[0]
        joined = np.concatenate(pieces)
        assert joined.dtype == np.float32
        np.testing.assert_array_equal(joined, expected)
        if len(waves) > 1 and seconds > 0:  # only the held-back tail waits for the flush
            assert len(pieces[-1]) == min(fade, len(expected))


def test_pieces_join_to_finish_of_the_streaming_chunks(tts, streamer, ref_wave):
    request = validate_request(ref_wave, REF_TEXT, LONG_TEXT, seed=11, nfe_steps=4)
    prepared = streamer.prepare(request)
    max_bytes = text.max_chunk_bytes(REF_TEXT, streamer.preprocess.reference(request).seconds, 1.0)
    assert prepared.chunks == text.split_for_streaming(LONG_TEXT, 50, max_chars=max_bytes)
    assert len(prepared.chunks) >= 4 and len(prepared.chunks[0].encode()) <= 50
    pieces = list(streamer.stream(request))
    assert [p.chunk_index for p in pieces] == list(range(len(prepared.chunks)))
    assert [p.is_final for p in pieces] == [False] * (len(pieces) - 1) + [True]
    expected = finish(chunk_waves(tts, prepared), prepared.ref_rms)
    # bit-exact: the same chunks through the same arithmetic as upstream's cross_fade + level restore
    np.testing.assert_array_equal(np.concatenate([p.audio for p in pieces]), expected)


def test_first_piece_comes_before_the_last_chunk_is_generated(tts, ref_wave):
    events = []

    class RecordingFlowMatcher:
        def __call__(self, jobs, on_step=None):
            events.append(("generate", jobs[0].chunk_index))
            return tts.flow_matching(jobs, on_step)

    streamer = StreamingSynthesizer(tts.preprocess, RecordingFlowMatcher(), tts.vocoder)
    request = validate_request(ref_wave, REF_TEXT, LONG_TEXT, seed=1, nfe_steps=2)
    for piece in streamer.stream(request):
        events.append(("piece", piece.chunk_index))
    last = events[-1][1]
    assert events.index(("piece", 0)) < events.index(("generate", last))
    assert events == [(kind, i) for i in range(last + 1) for kind in ("generate", "piece")]


def test_time_to_first_audio_in_process(streamer, ref_wave):
    request = validate_request(ref_wave, REF_TEXT, LONG_TEXT, nfe_steps=2)
    runs = time_to_first_audio(streamer, request, repeats=1, warmup=0)
    assert len(runs) == 1
    run = runs[0]
    assert 0 < run.first_audio < run.total and run.pieces >= 4 and run.audio_seconds > 1
    assert run.real_time_factor > 0


def test_streaming_latency_script(tiny_ckpt, ref_en, tmp_path):
    out = tmp_path / "runs.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "streaming_latency.py"), "--ckpt-dir", str(tiny_ckpt),
         "--device", "cpu", "--nfe", "2", "--repeats", "2", "--warmup", "0", "--reference-audio", str(ref_en),
         "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"time to first audio: median [\d.]+ ms", result.stdout), result.stdout
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and all(0 < r["first_audio_s"] < r["total_s"] and r["audio_s"] > 20 for r in runs)


# --------------------------------------------------------------------------- Triton


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_rendered_streaming_model(tiny_ckpt, tmp_path, target):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from f5_triton.serving.repository import RepositoryOptions, render
    from f5_triton.request import INPUTS

    options = dict(target=target, ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                   vocoder=tiny_ckpt / "vocos", gpus=[0, 1], streaming_instances_per_device=2, first_chunk_bytes=40,
                   output_cache_entries=0)
    repo = render(RepositoryOptions(**options), tmp_path / "repo")
    config = text_format.Parse((repo / "f5_tts_streaming" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.model_transaction_policy.decoupled and config.backend == "python"
    assert [i.name for i in config.input] == [f.name for f in INPUTS]
    assert [o.name for o in config.output] == ["waveform", "is_final"]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["first_chunk_bytes"] == "40" and params["output_cache_entries"] == "0"
    assert params["reference_cache_entries"] == "128"
    group = config.instance_group[0]
    kinds = model_config_pb2.ModelInstanceGroup
    assert group.count == 2 and group.kind == (kinds.KIND_CPU if target == "cpu" else kinds.KIND_GPU)
    assert list(group.gpus) == ([] if target == "cpu" else [0, 1])
    assert (repo / "f5_tts_streaming" / "1" / "model.py").is_file()
    preprocess = text_format.Parse((repo / "preprocess" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert preprocess.parameters["reference_cache_mb"].string_value == "64.0"
    assert not (render(RepositoryOptions(**options, streaming=False), tmp_path / "plain") / "f5_tts_streaming").exists()


def stream_pieces(server, wave, target_text, **optional) -> list[np.ndarray]:
    from f5_triton.client import stream_synthesize

    return list(stream_synthesize(server.urls.grpc, wave, REF_TEXT, target_text, timeout=120, **optional))


@pytest.mark.server
def test_server_stream_equals_in_process(streaming_server, tts, streamer, ref_wave, metric_samples):
    audio_seconds = ("f5_tts_generated_audio_seconds_total", (("model", "f5_tts_streaming"),))
    before = metric_samples(streaming_server, "f5_tts_generated_audio_seconds").get(audio_seconds, 0)
    pieces = stream_pieces(streaming_server, ref_wave, LONG_TEXT, seed=21, nfe_steps=8, speed=1.1)
    request = validate_request(ref_wave, REF_TEXT, LONG_TEXT, seed=21, nfe_steps=8, speed=1.1)
    prepared = streamer.prepare(request)
    assert len(pieces) == len(prepared.chunks) >= 4
    expected = finish(chunk_waves(tts, prepared), prepared.ref_rms)
    joined = np.concatenate(pieces)
    assert joined.shape == expected.shape
    assert np.abs(joined - expected).max() < 1e-4  # another process, same code: float noise at most
    # one response per chunk; that each leaves as soon as its chunk is generated (not all at the end)
    # is shown without timings by test_cancelling_stops_generation_before_the_last_chunk
    after = metric_samples(streaming_server, "f5_tts_generated_audio_seconds")[audio_seconds]
    assert after - before == pytest.approx(len(joined) / 24000, rel=1e-3)


@pytest.mark.server
def test_cancelling_stops_generation_before_the_last_chunk(streaming_server, ref_wave, metric_samples):
    """The client cancels as soon as it holds the first piece; the server then stops early, which it
    could not if it generated every chunk before sending the first (deterministic, unlike timings)."""
    from f5_triton.client import stream_synthesize

    cancelled = ("f5_tts_rejected_requests_total", (("model", "f5_tts_streaming"), ("reason", "cancelled")))
    before = metric_samples(streaming_server, "f5_tts_rejected").get(cancelled, 0)
    pieces = stream_synthesize(streaming_server.urls.grpc, ref_wave, REF_TEXT, LONG_TEXT * 2, nfe_steps=16, timeout=120)
    assert len(next(pieces)) > 0
    pieces.close()  # stop_stream(cancel_requests=True)
    pattern = re.compile(r"request cancelled by the client after (\d+) of (\d+) pieces")
    deadline = time.monotonic() + 60
    while not (found := pattern.findall(Path(streaming_server.log_path).read_text())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found, streaming_server.log_tail()
    sent, chunks = (int(v) for v in found[-1])
    assert 1 <= sent < chunks
    assert metric_samples(streaming_server, "f5_tts_rejected")[cancelled] == before + 1


@pytest.mark.server
def test_server_stream_rejects_bad_input(streaming_server, ref_wave):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="speed: is 5.0; allowed range"):
        stream_pieces(streaming_server, ref_wave, "Too fast.", speed=5.0)
    with pytest.raises(InferenceServerException, match="target_text: is empty"):
        stream_pieces(streaming_server, ref_wave, "   ")


@pytest.mark.server
def test_client_grpc_streaming(streaming_server, ref_en, tmp_path):
    out = tmp_path / "streamed.wav"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "client_grpc.py"), "--streaming", "--server-url", streaming_server.urls.grpc,
         "--reference-audio", str(ref_en), "--reference-text", REF_TEXT, "--target-text", LONG_TEXT,
         "--seed", "4", "--output-audio", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"time to first audio: \d+ ms, \d+ pieces", result.stdout), result.stdout
    wave, rate = sf.read(out, dtype="float32")
    assert rate == 24000 and len(wave) > 24000
