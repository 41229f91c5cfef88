"""The in-process pipeline: lengths as upstream computes them, batching, chunking, level restore."""

import numpy as np
import torch
import pytest
import soundfile as sf

from f5_triton import audio
from f5_triton.config import HOP_LENGTH, SAMPLE_RATE
from f5_triton.pipeline import TTS
from f5_triton.request import validate_request

REF_TEXT = "Some call me nature, others call me mother nature."


@pytest.fixture(scope="module")
def tts(tiny_ckpt):
    return TTS.from_paths(tiny_ckpt / "model.safetensors", tiny_ckpt / "vocab.txt", tiny_ckpt / "vocos")


def expected_samples(wave, ref_text, gen_text, speed=1.0):
    """Upstream infer_batch_process: duration = ref + ref/ref_bytes*gen_bytes/speed; output = Vocos.decode of
    the generated part, (frames - 1) * hop samples."""
    clipped = audio.clip_reference(wave, SAMPLE_RATE)
    ref_frames = len(clipped) // HOP_LENGTH
    ref = ref_text + ". " if not ref_text.endswith(".") else ref_text + "  "
    gen_bytes = len(gen_text.encode())
    local_speed = 0.3 if gen_bytes < 10 else speed
    duration = ref_frames + int(ref_frames / len(ref.encode()) * gen_bytes / local_speed)
    return (duration - ref_frames - 1) * HOP_LENGTH


def test_output_length_follows_upstream_duration(tts, ref_wave):
    text = "I don't really care what you call me."
    request = validate_request(ref_wave, REF_TEXT, text, seed=1, nfe_steps=4)
    out = tts.synthesize([request])[0]
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert len(out) == expected_samples(ref_wave, REF_TEXT, text)


def test_batch_equals_alone(tts, ref_wave, ref_zh):
    zh_wave, zh_rate = sf.read(ref_zh, dtype="float32")
    requests = [
        validate_request(ref_wave, REF_TEXT, "A short sentence to say.", seed=3, nfe_steps=4),
        validate_request(zh_wave, "对，这就是我，万人敬仰的太乙真人。", "你好，世界！今天天气很好。", sample_rate=zh_rate, seed=4,
                         nfe_steps=4),
        validate_request(ref_wave, REF_TEXT, "Different settings batch separately.", seed=5, nfe_steps=6,
                         cfg_strength=1.0),
    ]
    together = tts.synthesize(requests)
    for request, batched in zip(requests, together):
        alone = tts.synthesize([request])[0]
        assert batched.shape == alone.shape
        assert np.abs(batched - alone).max() < 1e-4


def test_seed_reproduces_and_differs(tts, ref_wave):
    make = lambda seed: validate_request(ref_wave, REF_TEXT, "Seeds make runs repeatable.", seed=seed, nfe_steps=3)
    a, b, c = (tts.synthesize([make(s)])[0] for s in (7, 7, 8))
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_long_text_is_chunked_and_cross_faded(tts, ref_wave):
    sentence = "This sentence is long enough to need its own chunk of audio, and then some more words. "
    text = sentence * 6
    request = validate_request(ref_wave, REF_TEXT, text, seed=1, nfe_steps=2)
    prepared = tts.preprocess(request)
    assert len(prepared.jobs) > 1
    out = tts.synthesize([request])[0]
    lengths = [expected_samples(ref_wave, REF_TEXT, chunk) for chunk in prepared.chunks]
    fade = int(0.15 * SAMPLE_RATE)
    assert len(out) == sum(lengths) - fade * (len(lengths) - 1)


def test_quiet_reference_level_is_restored(tts, ref_wave):
    """References under rms 0.1 are raised to 0.1 for generation and the output lowered back."""
    quiet = (ref_wave / np.sqrt(np.mean(ref_wave**2)) * 0.01).astype(np.float32)
    request = validate_request(quiet, REF_TEXT, "Level check here.", seed=2, nfe_steps=2)
    prepared = tts.preprocess(request)
    assert prepared.ref_rms == pytest.approx(0.01, rel=0.2)  # edges are trimmed before measuring
    raw = tts.vocoder(tts.flow_matching(prepared.jobs))[0]
    out = tts.synthesize([request])[0]
    assert np.abs(raw).max() > 0
    np.testing.assert_allclose(out, raw * prepared.ref_rms / 0.1, rtol=1e-5, atol=1e-7)


def test_resampled_reference(tts, ref_wave):
    import torch

    wave16 = audio.resample(torch.from_numpy(ref_wave)[None], SAMPLE_RATE, 16000)[0].numpy()
    request = validate_request(wave16, REF_TEXT, "Sixteen kilohertz reference.", sample_rate=16000, seed=1,
                               nfe_steps=2)
    out = tts.synthesize([request])[0]
    assert len(out) > 0 and np.isfinite(out).all()


def test_warm_up_runs_single_ragged_and_full_batches(tts, monkeypatch):
    """What a server runs before it reports ready: compiles and graph captures happen here, not on requests;
    then the engine covers every other shape up to the frame limit."""
    messages, covered = [], []
    monkeypatch.setattr(tts.flow_matching.model, "cover_shapes", lambda *args: covered.append(args[:3]) or 0)
    mels = tts.flow_matching.warm_up(4, nfe_steps=2, longest=96, log=messages.append, max_frames=512)
    assert [m.split(":")[0] for m in messages] == [f"warm-up batch {i}/4" for i in range(1, 5)] + ["warm-up"]
    assert covered == [(4, 512, 2)]
    lengths = [m.shape[0] for m in mels]
    # a second batch of several requests with other lengths: the packed step then compiles for any token count
    assert len(mels) == 1 + 2 + 4 + 3 and len(set(lengths[3:7])) == 4  # the full batch is ragged too
    assert all(m is not None and m.shape[1] == 100 and torch.isfinite(m).all() for m in mels)
