"""Audio in and out: read, resample, loudness, log-mel features, duration estimate, cross-fade.

Everything here follows upstream F5-TTS 1.1.22 (`f5_tts.infer.utils_infer` and
`f5_tts.model.modules.get_vocos_mel_spectrogram`) so that a request produces the same model inputs
as upstream's `infer_process` would.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch import nn

from f5_triton.config import (
    CROSS_FADE_SECONDS,
    HOP_LENGTH,
    N_FFT,
    N_MELS,
    SAMPLE_RATE,
    TARGET_RMS,
    WIN_LENGTH,
)
from f5_triton.errors import InvalidInputError

Wave = TypeVar("Wave", torch.Tensor, np.ndarray)


# --------------------------------------------------------------------------------------------
# Reading and resampling


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a wav, flac, ogg or mp3 file as mono float32 in [-1, 1] and its sample rate.

    Several channels are mixed down by their mean, as upstream does after `torchaudio.load`.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError("reference_audio", f"file not found: {path}", reason="not_found")
    try:
        data, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidInputError(
            "reference_audio", f"cannot read {path} as wav, flac, ogg or mp3 audio: {exc}", reason="unreadable"
        ) from exc
    if data.shape[0] == 0:
        raise InvalidInputError("reference_audio", f"{path} holds no samples", reason="empty")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return np.ascontiguousarray(wave, dtype=np.float32), int(sample_rate)


def resample(wave: torch.Tensor, orig_sr: int, target_sr: int = SAMPLE_RATE) -> torch.Tensor:
    """Resample along the last axis with torchaudio's default windowed-sinc filter (as upstream)."""
    if orig_sr == target_sr:
        return wave
    return torchaudio.functional.resample(wave, orig_sr, target_sr)


# --------------------------------------------------------------------------------------------
# Loudness


def _rms(wave: torch.Tensor | np.ndarray) -> float:
    if isinstance(wave, torch.Tensor):
        return float(torch.sqrt(torch.mean(torch.square(wave.float()))))
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64))))


def normalize_rms(wave: Wave, target_rms: float = TARGET_RMS) -> tuple[Wave, float]:
    """Raise a quiet reference to `target_rms`; return the (maybe scaled) wave and its original RMS.

    Louder references are left alone, as upstream. Digital silence (RMS 0) is also left alone, where
    upstream would divide by zero.
    """
    rms = _rms(wave)
    if 0.0 < rms < target_rms:
        wave = wave * (target_rms / rms)
    return wave, rms


def restore_rms(wave: Wave, rms: float, target_rms: float = TARGET_RMS) -> Wave:
    """Undo `normalize_rms` on generated audio: lower it back by rms / target_rms if it was raised."""
    if 0.0 < rms < target_rms:
        wave = wave * (rms / target_rms)
    return wave


# --------------------------------------------------------------------------------------------
# Mel features


class MelSpectrogram(nn.Module):
    """Log-mel features of Vocos mel-24khz: [b, samples] float -> [b, n_mels, frames].

    The same STFT/mel filterbank as `vocos.feature_extractors.MelSpectrogramFeatures(padding="center")`
    (hann window, magnitude, HTK mel scale, no filterbank norm, reflect-padded centred frames).
    The log floor is upstream F5-TTS's `clamp(min=1e-5)` (the features the DiT was trained on);
    Vocos clips at 1e-7 instead, which differs only on bins below log(1e-5) = -11.5.
    Build once and reuse: the filterbank and window are buffers.
    """

    def __init__(
        self,
        sample_rate: int = SAMPLE_RATE,
        n_fft: int = N_FFT,
        win_length: int = WIN_LENGTH,
        hop_length: int = HOP_LENGTH,
        n_mels: int = N_MELS,
        log_floor: float = 1e-5,
    ):
        super().__init__()
        self.log_floor = log_floor
        self.hop_length = hop_length
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate,
            n_fft=n_fft,
            win_length=win_length,
            hop_length=hop_length,
            n_mels=n_mels,
            power=1,
            center=True,
            normalized=False,
            norm=None,
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        assert wave.dim() == 2, f"expected [batch, samples], got {tuple(wave.shape)}"
        return self.mel(wave).clamp(min=self.log_floor).log()


def mel_frames(num_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Frames `MelSpectrogram` produces for `num_samples` samples (centred frames: one extra)."""
    return num_samples // hop_length + 1


def reference_frames(num_samples: int, hop_length: int = HOP_LENGTH) -> int:
    """Upstream's `ref_audio_len = samples // hop_length`: the reference's length in the duration
    estimate and where the generated part of the mel starts (one less than `mel_frames`)."""
    return num_samples // hop_length


def estimate_duration(ref_mel_frames: int, ref_text: str, gen_text: str, speed: float) -> int:
    """Total mel frames (reference + generated) for one chunk, as upstream's `_infer_basic`.

    `ref_mel_frames` is `reference_frames(samples)`; `ref_text` is the reference transcript as the
    model sees it (with the ". " / " " suffix upstream appends). Generated frames scale with the
    UTF-8 byte ratio of the texts; texts under 10 bytes use speed 0.3, as upstream.
    """
    ref_text_len = len(ref_text.encode("utf-8"))
    if ref_text_len == 0:
        raise InvalidInputError("reference_text", "must not be empty", reason="empty")
    if not speed > 0:
        raise InvalidInputError("speed", f"must be > 0, got {speed}", reason="out_of_range")
    gen_text_len = len(gen_text.encode("utf-8"))
    local_speed = 0.3 if gen_text_len < 10 else speed
    return ref_mel_frames + int(ref_mel_frames / ref_text_len * gen_text_len / local_speed)


# --------------------------------------------------------------------------------------------
# Joining chunks


def cross_fade(
    waves: list[np.ndarray], seconds: float = CROSS_FADE_SECONDS, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Join generated chunks with upstream's linear cross-fade (plain concatenation if seconds <= 0).

    The overlap is min(seconds * sample_rate, len(prev), len(next)) samples, where `prev` is
    everything joined so far; the result is float32 (upstream returns float64 after a fade).
    """
    if not waves:
        return np.zeros(0, dtype=np.float32)
    if seconds <= 0:
        return np.concatenate(waves).astype(np.float32, copy=False)
    joined = np.asarray(waves[0])
    for next_wave in waves[1:]:
        n = min(int(seconds * sample_rate), len(joined), len(next_wave))
        if n <= 0:
            joined = np.concatenate([joined, next_wave])
            continue
        overlap = joined[-n:] * np.linspace(1, 0, n) + next_wave[:n] * np.linspace(0, 1, n)
        joined = np.concatenate([joined[:-n], overlap, next_wave[n:]])
    return joined.astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------
# Reference clipping (upstream `preprocess_ref_audio_text`)
#
# Upstream runs pydub's silence tools on the file; this is the same algorithm on a numpy waveform
# so that the server needs neither pydub nor ffmpeg. It keeps pydub's arithmetic, which moves the
# result by whole 10 ms chunks if missed: positions are milliseconds (a clip's length is rounded to
# whole ms, a slice truncated to samples and zero-filled where the rounded length runs past the
# data), and loudness is `audioop.rms` of 16-bit samples, an integer.

_PCM_SCALE = 32768  # 16-bit full scale: pydub's `max_possible_amplitude` for the wav upstream reads
_PYDUB_SILENCE_RATE = 11025  # `AudioSegment.silent`'s rate; appending it resamples it (audioop.ratecv)


def _len_ms(num_samples: int, sample_rate: int) -> int:
    """`len(segment)`: milliseconds, rounded."""
    return round(1000 * num_samples / sample_rate)


def _ms_to_samples(ms, sample_rate: int):
    """pydub's `frame_count(ms)` truncated: the sample index of a position in ms (int or int array)."""
    if isinstance(ms, np.ndarray):
        return (ms * (sample_rate / 1000.0)).astype(np.int64)
    return int(ms * (sample_rate / 1000.0))


def _slice_ms(wave: np.ndarray, sample_rate: int, start_ms: int, end_ms: int | None = None) -> np.ndarray:
    """`segment[start_ms:end_ms]`: positions clamped to the rounded length, samples past the data zeros."""
    length_ms = _len_ms(len(wave), sample_rate)
    start = _ms_to_samples(min(start_ms, length_ms), sample_rate)
    end = _ms_to_samples(min(length_ms if end_ms is None else end_ms, length_ms), sample_rate)
    piece = wave[start:end]
    missing = end - start - len(piece)
    return np.concatenate([piece, np.zeros(missing, dtype=wave.dtype)]) if missing > 0 else piece


def _db_to_pcm(db: float) -> float:
    return 10 ** (db / 20) * _PCM_SCALE


def _window_rms(cum_sq: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """`audioop.rms` of wave[s:e] for each (s, e) in 16-bit units (truncated to an integer); samples
    past the data count as zeros, as in a zero-filled slice; 0 for empty windows."""
    counts = ends - starts
    last = len(cum_sq) - 1
    energy = cum_sq[np.minimum(ends, last)] - cum_sq[np.minimum(starts, last)]
    return np.floor(np.sqrt(np.maximum(energy, 0.0) / np.maximum(counts, 1))) * (counts > 0)


def _cum_sq(wave: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.square(wave * np.float64(_PCM_SCALE)))])


def _detect_silence(
    wave: np.ndarray, sample_rate: int, min_silence_ms: int, thresh_db: float, seek_ms: int
) -> list[list[int]]:
    """pydub.silence.detect_silence: [start_ms, end_ms] ranges whose RMS stays <= thresh_db."""
    length_ms = _len_ms(len(wave), sample_rate)
    if length_ms < min_silence_ms:
        return []
    last_start = length_ms - min_silence_ms
    starts = list(range(0, last_start + 1, seek_ms))
    if last_start % seek_ms:
        starts.append(last_start)
    starts_ms = np.asarray(starts, dtype=np.int64)
    rms = _window_rms(
        _cum_sq(wave),
        _ms_to_samples(starts_ms, sample_rate),
        _ms_to_samples(starts_ms + min_silence_ms, sample_rate),
    )
    silence_starts = starts_ms[rms <= _db_to_pcm(thresh_db)].tolist()
    if not silence_starts:
        return []

    ranges = []
    range_start = prev = silence_starts[0]
    for start in silence_starts[1:]:
        continuous = start == prev + seek_ms
        has_gap = start > prev + min_silence_ms
        if not continuous and has_gap:
            ranges.append([range_start, prev + min_silence_ms])
            range_start = start
        prev = start
    ranges.append([range_start, prev + min_silence_ms])
    return ranges


def _split_on_silence(
    wave: np.ndarray,
    sample_rate: int,
    min_silence_ms: int,
    thresh_db: float,
    keep_silence_ms: int,
    seek_ms: int,
) -> list[np.ndarray]:
    """pydub.silence.split_on_silence: non-silent pieces, each with up to keep_silence_ms around it;
    where two pieces' kept silences overlap they meet halfway."""
    length_ms = _len_ms(len(wave), sample_rate)
    silent = _detect_silence(wave, sample_rate, min_silence_ms, thresh_db, seek_ms)
    if not silent:
        nonsilent = [[0, length_ms]]
    elif silent[0] == [0, length_ms]:
        nonsilent = []
    else:
        nonsilent, prev_end = [], 0
        for start, end in silent:
            nonsilent.append([prev_end, start])
            prev_end = end
        if silent[-1][1] != length_ms:
            nonsilent.append([prev_end, length_ms])
        if nonsilent[0] == [0, 0]:
            nonsilent.pop(0)

    ranges = [[start - keep_silence_ms, end + keep_silence_ms] for start, end in nonsilent]
    for this, following in zip(ranges, ranges[1:]):
        if following[0] < this[1]:
            this[1] = (this[1] + following[0]) // 2
            following[0] = this[1]
    return [_slice_ms(wave, sample_rate, max(start, 0), min(end, length_ms)) for start, end in ranges]


def _join_until(pieces: list[np.ndarray], sample_rate: int, max_ms: int) -> np.ndarray:
    """Append pieces until one would take a result already over max_ms / 2 past max_ms."""
    joined: list[np.ndarray] = []
    total = 0
    for piece in pieces:
        if _len_ms(total, sample_rate) > max_ms // 2 and _len_ms(total + len(piece), sample_rate) > max_ms:
            break
        joined.append(piece)
        total += len(piece)
    return np.concatenate(joined) if joined else np.zeros(0, dtype=np.float32)


def _leading_silence_ms(wave: np.ndarray, sample_rate: int, thresh_db: float, chunk_ms: int = 10) -> int:
    """pydub.silence.detect_leading_silence: skip chunk_ms chunks quieter than thresh_db (dBFS <, a
    silent chunk is -inf dBFS)."""
    length_ms = _len_ms(len(wave), sample_rate)
    starts_ms = np.arange(0, max(length_ms, 0), chunk_ms, dtype=np.int64)
    if len(starts_ms) == 0:
        return 0
    rms = _window_rms(
        _cum_sq(wave),
        _ms_to_samples(starts_ms, sample_rate),
        _ms_to_samples(np.minimum(starts_ms + chunk_ms, length_ms), sample_rate),
    )
    loud = np.flatnonzero(rms >= _db_to_pcm(thresh_db))
    return min(int(starts_ms[loud[0]]) if len(loud) else length_ms, length_ms)


def trim_silence_edges(wave: np.ndarray, sample_rate: int, thresh_db: float = -42.0) -> np.ndarray:
    """Upstream's `remove_silence_edges`: drop leading and trailing 10 ms chunks below thresh_db."""
    wave = _slice_ms(wave, sample_rate, _leading_silence_ms(wave, sample_rate, thresh_db))
    end_ms = _leading_silence_ms(wave[::-1], sample_rate, thresh_db)
    return _slice_ms(wave, sample_rate, 0, _len_ms(len(wave), sample_rate) - end_ms) if end_ms > 0 else wave


def _appended_silence(ms: int, sample_rate: int) -> np.ndarray:
    """`AudioSegment.silent(ms)` (made at 11025 Hz) as appended to a clip of `sample_rate` >= 11025 Hz:
    audioop.ratecv turns its n samples into (n - 1) * rate // 11025 + 1."""
    n = _ms_to_samples(ms, _PYDUB_SILENCE_RATE)
    return np.zeros((n - 1) * sample_rate // _PYDUB_SILENCE_RATE + 1, dtype=np.float32)


def clip_reference(wave: np.ndarray, sample_rate: int, max_seconds: float = 12.0) -> np.ndarray:
    """Upstream's reference preprocessing: clip to max_seconds at a silence, trim edges, add 50 ms.

    1. split at silences >= 1 s below -50 dBFS (keeping up to 1 s of each) and keep pieces while
       the result stays <= max_seconds (once over max_seconds / 2, the next piece must still fit);
    2. if still too long, the same with silences >= 100 ms below -40 dBFS;
    3. if still too long, cut at max_seconds.
    Then leading/trailing silence below -42 dBFS is trimmed and 50 ms of silence appended (1198
    samples at 24 kHz: pydub resamples its 11025 Hz silence). Note that step 1 also runs on short
    clips: silences longer than 2 s shrink to 2 s, as upstream. References below 11025 Hz, which
    pydub would resample to 11025 Hz first, are clipped at their own rate.
    """
    wave = np.asarray(wave, dtype=np.float32)
    max_ms = int(round(max_seconds * 1000))

    clipped = _join_until(_split_on_silence(wave, sample_rate, 1000, -50.0, 1000, 10), sample_rate, max_ms)
    if _len_ms(len(clipped), sample_rate) > max_ms:
        pieces = _split_on_silence(wave, sample_rate, 100, -40.0, 1000, 10)
        clipped = _join_until(pieces, sample_rate, max_ms)
    if _len_ms(len(clipped), sample_rate) > max_ms:
        clipped = _slice_ms(clipped, sample_rate, 0, max_ms)

    clipped = trim_silence_edges(clipped, sample_rate, -42.0)
    tail = _appended_silence(50, sample_rate)
    return np.concatenate([clipped, tail]).astype(np.float32, copy=False)
