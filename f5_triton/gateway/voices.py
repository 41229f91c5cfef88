"""Registered voices: a reference clip and its transcript, `<folder>/<name>.wav` + `<folder>/<name>.txt`.

Files can be put there by hand or uploaded (`VoiceRegistry.add`); a voice is read when first used
and read again when its files change. Uploads are checked as a request's reference would be
(`schema.validate_request`: length, sample rate, silence, transcript size) before they are stored.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from f5_triton.audio import read_audio
from f5_triton.config import DEFAULT_LIMITS, Limits
from f5_triton.errors import InvalidInputError
from f5_triton.request import validate_request

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class UnknownVoice(LookupError):
    """No voice of that name is registered."""


@dataclass(frozen=True)
class Voice:
    name: str
    wave: np.ndarray  # float32 mono
    sample_rate: int
    transcript: str

    @property
    def seconds(self) -> float:
        return len(self.wave) / self.sample_rate


def check_name(name: str, field: str = "voice") -> str:
    """A voice name: letters, digits, '_', '-', '.', at most 64, not starting with '.' (so never a path)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise InvalidInputError(field, f"{name!r} is not a voice name: use 1-64 letters, digits, '_', '-' or '.', "
                                "starting with a letter or digit", "bad_name")
    return name


class VoiceRegistry:
    """The voices of one folder; thread-safe."""

    def __init__(self, folder: str | os.PathLike, limits: Limits = DEFAULT_LIMITS):
        self.folder = Path(folder)
        self.limits = limits
        self._loaded: dict[str, tuple[tuple[int, int], Voice]] = {}
        self._lock = threading.Lock()

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.folder / f"{name}.wav", self.folder / f"{name}.txt"

    def names(self) -> list[str]:
        """Registered voices: every <name>.wav with a <name>.txt beside it."""
        if not self.folder.is_dir():
            return []
        return sorted(p.stem for p in self.folder.glob("*.wav")
                      if NAME_PATTERN.fullmatch(p.stem) and p.with_suffix(".txt").is_file())

    def get(self, name: str) -> Voice:
        check_name(name)
        wav, txt = self._paths(name)
        try:
            stamp = (wav.stat().st_mtime_ns, txt.stat().st_mtime_ns)
        except FileNotFoundError:
            raise UnknownVoice(f"no voice named {name!r}; registered: {', '.join(self.names()) or 'none'}. Register "
                               "one with POST /v1/voices (multipart: name, transcript, audio), the page at /, or "
                               "<name>.wav + <name>.txt in the gateway's voices folder") from None
        with self._lock:
            cached = self._loaded.get(name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        wave, rate = read_audio(wav)
        voice = Voice(name, wave, rate, txt.read_text(encoding="utf-8").strip())
        with self._lock:
            self._loaded[name] = (stamp, voice)
        return voice

    def add(self, name: str, audio: bytes, transcript: str) -> Voice:
        """Check and store an uploaded voice (any format soundfile reads); the name must be new."""
        check_name(name, "name")
        wav, txt = self._paths(name)
        if wav.exists():
            raise FileExistsError(f"a voice named {name!r} exists; delete it first")
        self.folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".upload-", suffix=".audio") as upload:
            upload.write(audio)
            upload.flush()
            try:
                wave, rate = read_audio(upload.name)
            except InvalidInputError as exc:  # its message names the temporary file: say it plainly
                raise InvalidInputError("audio", "is not a readable audio file (wav, flac, ogg or mp3) with samples",
                                        exc.reason) from None
        # the checks a request's reference passes (the target text is not part of a voice)
        request = validate_request(wave, transcript, "-", sample_rate=rate, limits=self.limits)
        voice = Voice(name, request.reference_wav, rate, request.reference_text.strip())
        _write_atomic(txt, voice.transcript.encode("utf-8"))
        with tempfile.NamedTemporaryFile(dir=self.folder, prefix=".upload-", suffix=".wav", delete=False) as out:
            sf.write(out, voice.wave, rate, subtype="FLOAT", format="WAV")
        os.replace(out.name, wav)
        return voice

    def delete(self, name: str) -> None:
        check_name(name)
        wav, txt = self._paths(name)
        if not wav.exists():
            raise UnknownVoice(f"no voice named {name!r}")
        wav.unlink()
        txt.unlink(missing_ok=True)
        with self._lock:
            self._loaded.pop(name, None)


def _write_atomic(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".upload-", delete=False) as out:
        out.write(data)
    os.replace(out.name, path)
