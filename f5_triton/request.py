"""The request: what a synthesis request is, its wire fields (names, dtypes, shapes, limits) for both
served models, and its validation.

One table, `INPUTS`, drives the Triton configs, the validator, the clients and the docs, so a
field's name or limit is written down once. Everything a user sends passes `validate_request`,
which raises `InvalidInputError` naming the field and the limit; nothing else in the server has
to distrust its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from f5_triton.config import DEFAULT_LIMITS, DEFAULT_SAMPLING, SAMPLE_RATE, Limits
from f5_triton.errors import InvalidInputError


@dataclass(frozen=True)
class WireField:
    name: str
    triton_type: str  # as in config.pbtxt: TYPE_FP32, TYPE_STRING, ...
    dims: tuple[int, ...]
    optional: bool
    description: str


# Upstream F5-TTS's Triton runtime sends the first four; the rest are ours and optional.
INPUTS: tuple[WireField, ...] = (
    WireField("reference_wav", "TYPE_FP32", (-1,), False, "reference audio samples in [-1, 1], mono"),
    WireField("reference_wav_len", "TYPE_INT32", (1,), True, "valid samples in reference_wav (rest is padding)"),
    WireField("reference_text", "TYPE_STRING", (1,), False, "transcript of the reference audio, UTF-8"),
    WireField("target_text", "TYPE_STRING", (1,), False, "text to speak, UTF-8"),
    WireField("sample_rate", "TYPE_INT32", (1,), True, f"sample rate of reference_wav (default {SAMPLE_RATE})"),
    WireField("nfe_steps", "TYPE_INT32", (1,), True, f"ODE steps (default {DEFAULT_SAMPLING.nfe_steps})"),
    WireField("cfg_strength", "TYPE_FP32", (1,), True, f"guidance strength (default {DEFAULT_SAMPLING.cfg_strength})"),
    WireField("speed", "TYPE_FP32", (1,), True, "speaking rate, 1.0 = reference pace"),
    WireField("seed", "TYPE_INT64", (1,), True, "noise seed for reproducible output (default: random)"),
)
OUTPUTS: tuple[WireField, ...] = (
    WireField("waveform", "TYPE_FP32", (-1,), False, f"generated speech, {SAMPLE_RATE} Hz mono float32"),
)

MODEL = "f5_tts"
STREAMING_MODEL = "f5_tts_streaming"
# The streaming model's outputs: every response carries the next piece of `waveform`; the last one
# (sent with Triton's final flag) has is_final = true.
STREAM_OUTPUTS: tuple[WireField, ...] = OUTPUTS + (
    WireField("is_final", "TYPE_BOOL", (1,), False, "true on the last response of a stream"),)

INT64_MAX = 2**63 - 1


@dataclass
class SynthesisRequest:
    """A validated request, in plain Python/numpy types."""

    reference_wav: np.ndarray  # float32 mono at `sample_rate`
    reference_text: str
    target_text: str
    sample_rate: int = SAMPLE_RATE
    nfe_steps: int = DEFAULT_SAMPLING.nfe_steps
    cfg_strength: float = DEFAULT_SAMPLING.cfg_strength
    speed: float = DEFAULT_SAMPLING.speed
    seed: int | None = None
    sway_sampling_coef: float = DEFAULT_SAMPLING.sway_sampling_coef


def _decode_text(field: str, value, limits: Limits) -> str:
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise InvalidInputError(field, f"expected one string, got an array of shape {value.shape}", "bad_shape")
        value = value.reshape(-1)[0]
    if isinstance(value, (bytes, np.bytes_)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInputError(field, f"is not valid UTF-8 (byte {exc.start})", "bad_utf8") from None
    if not isinstance(value, str):
        raise InvalidInputError(field, f"expected a string, got {type(value).__name__}", "bad_type")
    if not any(ch.isprintable() and not ch.isspace() for ch in value):
        raise InvalidInputError(field, "is empty, or only whitespace and control characters", "empty_text")
    size = len(value.encode("utf-8"))
    if size > limits.max_text_bytes:
        raise InvalidInputError(field, f"is {size} bytes; the limit is {limits.max_text_bytes} bytes", "text_too_long")
    return value


def _scalar(field: str, value, kind: type, low, high, what: str = "", unit: str = "", note: str = ""):
    """One number of `kind` in [low, high]; `what` and `unit` say what it is in a user's words (a sample rate in
    Hz), `note` where the limit comes from."""
    array = np.asarray(value)
    if array.size != 1:
        raise InvalidInputError(field, f"expected one value, got shape {array.shape}", "bad_shape")
    item = array.reshape(-1)[0]
    if kind is int:
        if not np.issubdtype(array.dtype, np.integer):
            raise InvalidInputError(field, f"expected an integer, got {array.dtype}", "bad_type")
        item = int(item)
    else:
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise InvalidInputError(field, f"expected a number, got {array.dtype}", "bad_type")
        item = float(item)
        if not math.isfinite(item):
            raise InvalidInputError(field, f"must be finite, got {item}", "not_finite")
    if not low <= item <= high:
        subject = f"{what} {item}{unit} is outside the allowed range" if what else f"is {item}{unit}; allowed range is"
        raise InvalidInputError(field, f"{subject} [{low}, {high}]{unit}{note}", "out_of_range")
    return item


def validate_request(reference_wav, reference_text, target_text, *, reference_wav_len=None, sample_rate=None,
                     nfe_steps=None, cfg_strength=None, speed=None, seed=None,
                     limits: Limits = DEFAULT_LIMITS) -> SynthesisRequest:
    """Check every field of one request; raise InvalidInputError(field, limit) on the first problem."""
    for name, value in (("reference_wav", reference_wav), ("reference_text", reference_text),
                        ("target_text", target_text)):
        if value is None:
            raise InvalidInputError(name, "is required but was not sent", "missing")
    wav = np.asarray(reference_wav)
    if wav.dtype != np.float32:
        raise InvalidInputError("reference_wav", f"must be FP32, got {wav.dtype}", "bad_type")
    if wav.ndim == 2 and wav.shape[0] == 1:
        wav = wav[0]
    if wav.ndim != 1:
        raise InvalidInputError("reference_wav", f"must be one mono channel [samples], got shape {wav.shape}", "bad_shape")
    if reference_wav_len is not None:
        length = _scalar("reference_wav_len", reference_wav_len, int, 0, wav.shape[0],
                         note=", the samples reference_wav holds")
        wav = wav[:length]
    rate = SAMPLE_RATE if sample_rate is None else _scalar(
        "sample_rate", sample_rate, int, limits.min_sample_rate, limits.max_sample_rate, what="sample rate", unit=" Hz")
    if wav.shape[0] == 0:
        raise InvalidInputError("reference_wav", "is empty", "empty_audio")
    if not np.all(np.isfinite(wav)):
        raise InvalidInputError("reference_wav", "contains NaN or Inf samples", "not_finite")
    seconds = wav.shape[0] / rate
    if seconds < limits.min_reference_seconds:
        raise InvalidInputError("reference_wav", f"is {seconds:.3f} s; the minimum is {limits.min_reference_seconds} s",
                                "audio_too_short")
    if seconds > limits.max_reference_seconds:
        raise InvalidInputError("reference_wav", f"is {seconds:.1f} s; the maximum is {limits.max_reference_seconds} s",
                                "audio_too_long")
    peak = float(np.max(np.abs(wav)))
    if peak < 1e-4:
        raise InvalidInputError("reference_wav", f"is silent (peak {peak:.2e}); send speech", "silent_audio")
    if peak > 100.0:
        raise InvalidInputError("reference_wav", f"peak {peak:.1f} is far outside [-1, 1]: send float samples, "
                                "not raw integers", "out_of_range")
    request = SynthesisRequest(
        reference_wav=np.ascontiguousarray(wav, dtype=np.float32),
        reference_text=_decode_text("reference_text", reference_text, limits),
        target_text=_decode_text("target_text", target_text, limits),
        sample_rate=rate,
    )
    if nfe_steps is not None:
        request.nfe_steps = _scalar("nfe_steps", nfe_steps, int, limits.min_nfe_steps, limits.max_nfe_steps)
    if cfg_strength is not None:
        request.cfg_strength = _scalar("cfg_strength", cfg_strength, float, limits.min_cfg_strength,
                                       limits.max_cfg_strength)
    if speed is not None:
        request.speed = _scalar("speed", speed, float, limits.min_speed, limits.max_speed)
    if seed is not None:
        request.seed = _scalar("seed", seed, int, 0, INT64_MAX)
    return request
