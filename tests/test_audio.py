"""f5_triton.audio against vocos / upstream F5-TTS behaviour."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from f5_triton.audio import (
    MelSpectrogram,
    clip_reference,
    cross_fade,
    estimate_duration,
    mel_frames,
    normalize_rms,
    read_audio,
    reference_frames,
    resample,
    restore_rms,
)
from f5_triton.config import HOP_LENGTH, SAMPLE_RATE, TARGET_RMS
from f5_triton.errors import InvalidInputError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def speech() -> tuple[np.ndarray, int]:
    path = DATA / "basic_ref_en.wav"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    return read_audio(path)


# --------------------------------------------------------------------------------------------
# Mel features


def test_mel_equals_vocos_feature_extractor_on_speech():
    from vocos.feature_extractors import MelSpectrogramFeatures

    wave, sr = speech()
    assert sr == SAMPLE_RATE
    x = torch.from_numpy(wave)[None]
    ours = MelSpectrogram()(x)
    vocos_features = MelSpectrogramFeatures(
        sample_rate=24000, n_fft=1024, hop_length=256, n_mels=100, padding="center"
    )
    expected = vocos_features(x)
    assert ours.shape == (1, 100, mel_frames(len(wave)))
    assert (ours - expected).abs().max().item() < 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_mel_equals_upstream_f5_features_including_silence():
    from upstream import load

    modules = load("model.modules")
    torch.manual_seed(0)
    x = torch.randn(2, 9000) * 0.1
    x[1, 3000:] = 0.0  # digital silence: upstream's log floor (1e-5) applies, not Vocos' 1e-7
    ours = MelSpectrogram()(x)
    expected = modules.get_vocos_mel_spectrogram(x)
    assert ours.shape == expected.shape == (2, 100, mel_frames(9000))
    assert (ours - expected).abs().max().item() < 1e-5
    assert ours.min().item() == pytest.approx(math.log(1e-5), abs=1e-6)


def test_frame_counts():
    assert mel_frames(24000) == 24000 // HOP_LENGTH + 1
    assert reference_frames(24000) == 93
    assert mel_frames(255) == 1 and reference_frames(255) == 0


# --------------------------------------------------------------------------------------------
# Reading and resampling


@pytest.mark.parametrize("fmt,subtype", [("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS")])
@pytest.mark.parametrize("sr", [16000, 44100])
def test_read_audio_stereo_to_mono(tmp_path, fmt, subtype, sr):
    t = np.arange(int(0.5 * sr)) / sr
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 660 * t)
    path = tmp_path / f"ref.{fmt}"
    sf.write(path, np.stack([left, right], axis=1), sr, format=fmt.upper(), subtype=subtype)

    wave, got_sr = read_audio(path)
    assert got_sr == sr
    assert wave.dtype == np.float32 and wave.ndim == 1
    stereo, _ = sf.read(path, dtype="float32")
    np.testing.assert_allclose(wave, stereo.mean(axis=1), atol=1e-6)
    tol = 1e-3 if fmt != "ogg" else 0.05  # vorbis is lossy
    assert np.abs(wave - (left + right) / 2)[1000:-1000].max() < tol


def test_read_audio_mono_is_unchanged(tmp_path):
    data = (np.random.default_rng(0).standard_normal(1600) * 0.1).astype(np.float32)
    sf.write(tmp_path / "m.wav", data, 16000, subtype="FLOAT")
    wave, sr = read_audio(tmp_path / "m.wav")
    assert sr == 16000
    np.testing.assert_array_equal(wave, data)


def test_read_audio_errors(tmp_path):
    missing = tmp_path / "nope.wav"
    with pytest.raises(InvalidInputError) as err:
        read_audio(missing)
    assert err.value.field == "reference_audio" and str(missing) in str(err.value)

    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio" * 10)
    with pytest.raises(InvalidInputError) as err:
        read_audio(garbage)
    assert err.value.field == "reference_audio" and err.value.reason == "unreadable"
    assert str(garbage) in str(err.value) and "as wav, flac, ogg or mp3 audio" in str(err.value)

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(InvalidInputError) as err:
        read_audio(empty)
    assert err.value.reason == "empty"


def test_resample_matches_upstream_transform():
    torch.manual_seed(0)
    for sr in (16000, 44100):
        wave = torch.randn(1, sr // 2)
        ours = resample(wave, sr)
        expected = torchaudio.transforms.Resample(sr, SAMPLE_RATE)(wave)  # upstream's call
        assert ours.shape == expected.shape == (1, math.ceil(wave.shape[-1] * SAMPLE_RATE / sr))
        assert torch.allclose(ours, expected, atol=2e-5)  # the transform caches its kernel in fp32
    same = torch.randn(100)
    assert resample(same, SAMPLE_RATE) is same


def test_resample_keeps_a_tone():
    t = torch.arange(16000) / 16000
    out = resample(torch.sin(2 * math.pi * 440 * t), 16000)
    expected = torch.sin(2 * math.pi * 440 * torch.arange(24000) / 24000)
    assert (out - expected)[200:-200].abs().max().item() < 1e-2


# --------------------------------------------------------------------------------------------
# Loudness


def test_rms_normalise_and_restore_round_trip():
    rng = np.random.default_rng(0)
    quiet = (rng.standard_normal(24000) * 0.01).astype(np.float32)
    raised, rms = normalize_rms(quiet)
    assert rms == pytest.approx(float(np.sqrt(np.mean(quiet.astype(np.float64) ** 2))), rel=1e-6)
    assert float(np.sqrt(np.mean(raised.astype(np.float64) ** 2))) == pytest.approx(TARGET_RMS, rel=1e-5)
    np.testing.assert_allclose(restore_rms(raised, rms), quiet, rtol=1e-5, atol=1e-8)

    as_tensor, rms_t = normalize_rms(torch.from_numpy(quiet))
    assert rms_t == pytest.approx(rms, rel=1e-6)
    assert torch.allclose(restore_rms(as_tensor, rms_t), torch.from_numpy(quiet), atol=1e-7)


def test_loud_and_silent_references_are_left_alone():
    loud = np.full(100, 0.5, dtype=np.float32)
    same, rms = normalize_rms(loud)
    assert rms == pytest.approx(0.5) and same is loud
    assert restore_rms(loud, rms) is loud

    silent = np.zeros(100, dtype=np.float32)
    out, rms = normalize_rms(silent)
    assert rms == 0.0 and np.all(np.isfinite(out))
    assert restore_rms(np.ones(3), rms).tolist() == [1.0, 1.0, 1.0]


# --------------------------------------------------------------------------------------------
# Duration


def upstream_duration(ref_audio_len: int, ref_text: str, gen_text: str, speed: float) -> int:
    """Verbatim from upstream `infer_batch_process._infer_basic` (fix_duration=None)."""
    local_speed = speed
    if len(gen_text.encode("utf-8")) < 10:
        local_speed = 0.3
    ref_text_len = len(ref_text.encode("utf-8"))
    gen_text_len = len(gen_text.encode("utf-8"))
    return ref_audio_len + int(ref_audio_len / ref_text_len * gen_text_len / local_speed)


@pytest.mark.parametrize(
    "ref_frames,ref_text,gen_text,speed",
    [
        (500, "Some call me nature, others call me mother nature. ", "I don't really care what you call me.", 1.0),
        (633, "对，这就是我，万人敬仰的太乙真人。 ", "突然，身边一阵笑声。我看着他们，意气风发。", 1.0),
        (500, "Some call me nature. ", "Hi there.", 1.0),  # 9 bytes: upstream uses speed 0.3
        (500, "Some call me nature. ", "Hi there!!", 2.0),  # 10 bytes: the request's speed
        (377, "A short one. ", "A considerably longer sentence to be spoken slowly.", 0.7),
    ],
)
def test_duration_matches_upstream(ref_frames, ref_text, gen_text, speed):
    assert estimate_duration(ref_frames, ref_text, gen_text, speed) == upstream_duration(
        ref_frames, ref_text, gen_text, speed
    )


def test_duration_by_hand_and_errors():
    # 100 frames for 10 bytes; 20 bytes at speed 2 -> 100 more frames; 5 bytes at speed 0.3 -> 166
    assert estimate_duration(100, "0123456789", "01234567890123456789", 2.0) == 200
    assert estimate_duration(100, "0123456789", "01234", 2.0) == 100 + int(100 / 10 * 5 / 0.3)
    with pytest.raises(InvalidInputError, match="reference_text: must not be empty"):
        estimate_duration(100, "", "hello world", 1.0)
    with pytest.raises(InvalidInputError, match="speed: must be > 0, got 0.0"):
        estimate_duration(100, "ref", "hello world", 0.0)


# --------------------------------------------------------------------------------------------
# Cross-fade


def test_cross_fade_by_hand():
    # sample_rate 10, 0.3 s -> 3 samples: fade out [1, .5, 0], fade in [0, .5, 1]
    out = cross_fade([np.ones(5), np.full(4, 2.0)], seconds=0.3, sample_rate=10)
    np.testing.assert_allclose(out, [1, 1, 1, 1.5, 2, 2])
    assert out.dtype == np.float32

    # the second wave is shorter than the fade: the overlap is its length
    out = cross_fade([np.ones(5), np.full(2, 3.0)], seconds=0.3, sample_rate=10)
    np.testing.assert_allclose(out, [1, 1, 1, 1, 3])

    # three waves: each fade overlaps the end of everything joined so far
    out = cross_fade([np.zeros(4), np.ones(4), np.zeros(4)], seconds=0.2, sample_rate=10)
    np.testing.assert_allclose(out, [0, 0, 0, 1, 1, 0, 0, 0])


def test_cross_fade_lengths_and_plain_concatenation():
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(n).astype(np.float32) for n in (24000, 30000, 12345)]
    n = int(0.15 * 24000)
    out = cross_fade(waves)
    assert len(out) == sum(map(len, waves)) - 2 * n
    np.testing.assert_array_equal(out[: 24000 - n], waves[0][: 24000 - n])
    np.testing.assert_allclose(out[-(12345 - n) :], waves[2][n:])

    np.testing.assert_array_equal(cross_fade(waves, seconds=0), np.concatenate(waves))
    np.testing.assert_array_equal(cross_fade(waves[:1]), waves[0])
    assert cross_fade([]).shape == (0,)


# --------------------------------------------------------------------------------------------
# Reference clipping


def pydub_tail(sr: int) -> np.ndarray:
    """The 50 ms of silence upstream appends, as pydub makes it at `sr` (11025 Hz silence, resampled)."""
    from pydub import AudioSegment

    tail = AudioSegment.silent(duration=0, frame_rate=sr) + AudioSegment.silent(duration=50)
    return np.zeros(int(tail.frame_count()), dtype=np.float32)


def burst(seconds: float, sr: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(seconds * sr)) * 0.3).astype(np.float32)


def gap(seconds: float, sr: int) -> np.ndarray:
    return np.zeros(int(seconds * sr), dtype=np.float32)


def test_long_clip_is_cut_at_a_long_silence():
    sr = SAMPLE_RATE
    speech_parts = [burst(4, sr, 1), gap(1.5, sr), burst(4, sr, 2), gap(1.5, sr), burst(4, sr, 3)]
    parts = [gap(0.5, sr), *speech_parts, gap(1, sr)]
    wave = np.concatenate(parts)  # 16.5 s
    out = clip_reference(wave, sr)
    # pieces of 5.25 s, 5.5 s, 5.75 s: the third would pass 12 s; edges trimmed, 50 ms added
    speech_part = np.concatenate(parts[1:4])
    assert len(out) <= 12.05 * sr
    np.testing.assert_array_equal(out[: len(speech_part)], speech_part)
    np.testing.assert_array_equal(out[len(speech_part) :], pydub_tail(sr))


def test_long_clip_without_long_silence_is_cut_at_a_short_one():
    sr = SAMPLE_RATE
    parts = [burst(5, sr, 1), gap(0.3, sr), burst(5, sr, 2), gap(0.3, sr), burst(5, sr, 3)]
    out = clip_reference(np.concatenate(parts), sr)
    speech_part = np.concatenate(parts[:3])
    assert len(out) == len(speech_part) + len(pydub_tail(sr))
    np.testing.assert_array_equal(out[: len(speech_part)], speech_part)


def test_long_clip_without_silence_is_cut_hard():
    sr = SAMPLE_RATE
    wave = burst(15, sr, 4)
    out = clip_reference(wave, sr)
    assert len(out) == 12 * sr + len(pydub_tail(sr))
    np.testing.assert_array_equal(out[: 12 * sr], wave[: 12 * sr])


@pytest.mark.parametrize("sr", [24000, 44100, 16000])
def test_short_clip_only_loses_silent_edges(sr):
    speech_part = burst(3, sr, 5)
    out = clip_reference(np.concatenate([gap(0.3, sr), speech_part, gap(0.4, sr)]), sr)
    np.testing.assert_array_equal(out, np.concatenate([speech_part, pydub_tail(sr)]))
    # quiet noise (-60 dBFS) counts as silence at the edges
    noise = (np.random.default_rng(6).standard_normal(int(0.2 * sr)) * 1e-3).astype(np.float32)
    out = clip_reference(np.concatenate([noise, speech_part, noise]), sr)
    np.testing.assert_array_equal(out[: len(speech_part)], speech_part)
    assert len(out) == len(speech_part) + len(pydub_tail(sr))


def test_clip_reference_on_speech():
    wave, sr = speech()
    out = clip_reference(wave, sr)
    assert 4.5 * sr < len(out) < len(wave) + 0.05 * sr  # edge silence trimmed, nothing else
    long = np.concatenate([wave, gap(1.5, sr), wave, gap(1.5, sr), wave])  # 19 s
    out = clip_reference(long, sr)
    assert len(out) <= 12.05 * sr
    assert len(out) < 2 * len(wave) + 1.5 * sr  # cut in the second silence, not mid-speech


def reference_case(name: str, ref_en) -> tuple[np.ndarray, int]:
    """16-bit clips that take each branch of upstream's clipping, at 24 kHz and other rates."""
    wave, sr = sf.read(ref_en, dtype="float32")
    if name == "speech":
        return wave, sr
    if name == "quiet":
        return wave * 0.05, sr
    if name in ("16 kHz", "44.1 kHz"):
        rate = 16000 if name == "16 kHz" else 44100
        return torchaudio.functional.resample(torch.from_numpy(wave), sr, rate).numpy(), rate
    if name == "long silences":
        return np.concatenate([wave, gap(1.5, sr), wave, gap(1.5, sr), wave]), sr
    if name == "short silences":
        return np.concatenate([burst(5, sr, 1) * 0.5, gap(0.3, sr), burst(5, sr, 2) * 0.5, gap(0.3, sr),
                               burst(5, sr, 3) * 0.5]), sr
    return burst(15, sr, 4) * 0.5, sr  # no silence: a hard cut


@pytest.mark.parametrize("name", ["speech", "quiet", "16 kHz", "44.1 kHz", "long silences", "short silences",
                                  "no silence"])
def test_clip_reference_equals_upstream_preprocess(tmp_path, ref_en, name):
    """Sample for sample what upstream's `preprocess_ref_audio_text` writes (pydub on the 16-bit file):
    pydub's whole-ms lengths, zero-filled slices, integer RMS and resampled 50 ms tail included."""
    import upstream

    wave, sr = reference_case(name, ref_en)
    path = tmp_path / "ref.wav"
    sf.write(path, wave, sr, subtype="PCM_16")
    clipped_path, _ = upstream.load_infer().preprocess_ref_audio_text(str(path), "x.", show_info=lambda *a: None)
    expected, rate = sf.read(clipped_path, dtype="float32")
    got = clip_reference(read_audio(path)[0], sr)
    assert rate == sr
    np.testing.assert_array_equal(got, expected)
