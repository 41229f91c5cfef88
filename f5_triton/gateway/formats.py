"""Audio encodings of the speech endpoint: wav, pcm (and mp3 when `lameenc` is installed).

All are 24 kHz mono 16-bit, as OpenAI's: `pcm` is raw little-endian samples, `wav` the same behind
a RIFF header (a streamed wav cannot know its length and says 0xFFFFFFFF, as OpenAI's does), `mp3`
is encoded by LAME through the `lameenc` wheel (no ffmpeg). Every encoder works piece by piece, so
streamed and whole responses share the code.
"""

from __future__ import annotations

import struct

import numpy as np

from f5_triton.config import SAMPLE_RATE

CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg"}
UNKNOWN_SIZE = 0xFFFFFFFF


def _has_lameenc() -> bool:
    try:
        import lameenc  # noqa: F401
    except ImportError:
        return False
    return True


def supported_formats() -> list[str]:
    return [f for f in CONTENT_TYPES if f != "mp3" or _has_lameenc()]


def to_pcm16(wave: np.ndarray, volume: float = 1.0) -> bytes:
    """float32 in [-1, 1] (times `volume`, then clipped) -> 16-bit little-endian samples."""
    scaled = np.clip(np.asarray(wave, dtype=np.float32) * np.float32(volume), -1.0, 1.0)
    return (scaled * 32767.0).round().astype("<i2").tobytes()


def wav_header(data_bytes: int | None, sample_rate: int = SAMPLE_RATE) -> bytes:
    """RIFF/WAVE header of 16-bit mono PCM; `data_bytes` None for a stream of unknown length."""
    data_size = UNKNOWN_SIZE if data_bytes is None else data_bytes
    riff_size = UNKNOWN_SIZE if data_bytes is None else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data_size))


class Encoder:
    """pcm: `start()`, then `encode(piece)` per waveform piece, then `finish()`; concatenated, the bytes."""

    def __init__(self, volume: float = 1.0):
        self.volume = volume

    def start(self) -> bytes:
        return b""

    def encode(self, wave: np.ndarray) -> bytes:
        return to_pcm16(wave, self.volume)

    def finish(self) -> bytes:
        return b""


class WavEncoder(Encoder):
    def __init__(self, volume: float = 1.0, total_samples: int | None = None):
        super().__init__(volume)
        self.total_samples = total_samples

    def start(self) -> bytes:
        return wav_header(None if self.total_samples is None else 2 * self.total_samples)


class Mp3Encoder(Encoder):
    def __init__(self, volume: float = 1.0, bitrate_kbps: int = 64):
        import lameenc

        super().__init__(volume)
        self._lame = lameenc.Encoder()
        self._lame.set_bit_rate(bitrate_kbps)
        self._lame.set_in_sample_rate(SAMPLE_RATE)
        self._lame.set_channels(1)
        self._lame.set_quality(2)

    def encode(self, wave: np.ndarray) -> bytes:
        return bytes(self._lame.encode(to_pcm16(wave, self.volume)))

    def finish(self) -> bytes:
        return bytes(self._lame.flush())


def encoder(response_format: str, volume: float = 1.0, total_samples: int | None = None) -> Encoder:
    """An encoder for one response; `total_samples` lets a whole wav carry its real length."""
    if response_format == "wav":
        return WavEncoder(volume, total_samples)
    if response_format == "mp3":
        return Mp3Encoder(volume)
    if response_format == "pcm":
        return Encoder(volume)
    raise ValueError(f"unsupported response format {response_format!r}")


def encode(response_format: str, wave: np.ndarray, volume: float = 1.0) -> bytes:
    """A whole waveform in one encoding."""
    enc = encoder(response_format, volume, total_samples=len(wave))
    return enc.start() + enc.encode(wave) + enc.finish()
