"""The last checks before generated audio leaves the pipeline: NaN/Inf is an error, never audio."""

from __future__ import annotations

import numpy as np
import torch


class GenerationError(RuntimeError):
    """The model produced something that must not be returned as audio (NaN/Inf)."""


def check_finite(mels: list[torch.Tensor]) -> list[torch.Tensor]:
    for i, mel in enumerate(mels):
        if not torch.isfinite(mel).all():
            raise GenerationError(f"generated mel of chunk {i} contains NaN/Inf; not returned as audio "
                                  f"(try fp32, or report the input)")
    return mels


def check_finite_audio(wave: np.ndarray) -> np.ndarray:
    if not np.isfinite(wave).all():
        raise GenerationError("generated waveform contains NaN/Inf; not returned as audio (try fp32, or report "
                              "the input)")
    return wave
