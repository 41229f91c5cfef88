"""Pacing of streams: when a listener runs out of audio, and how long the scheduler's work takes.

A listener starts playing a stream at its first piece and plays without pause, so the audio handed out so far
runs out at `Playback.deadline`; a piece that comes later than that is a stall. The stream scheduler
(`stream_scheduler`) uses two things from here to never let that happen to a stream it admitted:

- `Playback`: each stream's deadline, from the pieces it was handed;
- `WorkCost`: how long a batch of chunks takes, learnt from the rounds the scheduler ran (seconds of an ODE step
  as a line in the step's tokens, fitted with forgetting, and the vocoder's seconds as a line in its frames), so
  it follows the card, the model, the engine and the step count without configuration.

Nothing here knows torch or Triton.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from f5_triton.config import HOP_LENGTH, SAMPLE_RATE


@dataclass
class Playback:
    """A listener's position: it started at the first non-empty piece and has `seconds` of audio."""

    started: float | None = None  # wall-clock time of the first non-empty piece
    seconds: float = 0.0

    def add(self, now: float, audio_seconds: float) -> None:
        if audio_seconds <= 0:
            return
        if self.started is None:
            self.started = now
        self.seconds += audio_seconds

    @property
    def deadline(self) -> float:
        """When the audio handed out so far has been played (infinity before the first piece)."""
        return math.inf if self.started is None else self.started + self.seconds


@dataclass(frozen=True)
class Chunk:
    """What one text chunk costs: DiT tokens per step (both guidance rows), ODE steps, and mel frames to vocode."""

    tokens: int
    steps: int
    frames: int  # generated frames (the vocoder's input, the audio's length)

    @property
    def audio_seconds(self) -> float:
        return self.frames * HOP_LENGTH / SAMPLE_RATE


class LineFit:
    """y ≈ a + b·x by least squares with exponential forgetting (each observation weighs `keep` times the one
    after it), a, b >= 0. Written here: it is five running sums, and the fit must stay cheap inside each round."""

    def __init__(self, keep: float = 0.95):
        self.keep = keep
        self.count = 0
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, x: float, y: float) -> None:
        k = self.keep
        self._w, self._x, self._y = k * self._w + 1, k * self._x + x, k * self._y + y
        self._xx, self._xy = k * self._xx + x * x, k * self._xy + x * y
        self.count += 1

    def coefficients(self) -> tuple[float, float]:
        if not self.count:
            return 0.0, 0.0
        mean_x, mean_y = self._x / self._w, self._y / self._w
        var = self._xx / self._w - mean_x * mean_x
        if var > 1e-9 * max(mean_x * mean_x, 1.0):
            b = (self._xy / self._w - mean_x * mean_y) / var
            a = mean_y - b * mean_x
            if a >= 0 and b >= 0:
                return a, b
        # one size seen so far (or a fit with a negative part): all of it per x, which over-estimates smaller work
        if mean_x > 0:
            return 0.0, max(self._xy / self._xx, 0.0)
        return max(mean_y, 0.0), 0.0

    def __call__(self, x: float) -> float:
        a, b = self.coefficients()
        return a + b * x


# Estimates are stretched by at least this much (more while rounds run slower than their line: `slowdown`): the fit
# is of recent rounds, and a round can be slower than its line (attention grows with the square of a sequence).
SAFETY = 1.25


@dataclass
class WorkCost:
    """Seconds of the scheduler's work, learnt from the rounds it ran (`observe_steps`, `observe_vocoder`)."""

    step: LineFit = field(default_factory=LineFit)  # seconds of one ODE step of a batch, by its tokens
    vocoder: LineFit = field(default_factory=LineFit)  # seconds of one vocoder call, by its frames
    # how much slower than their line the last rounds ran: rises at once, falls slowly (a busy host, a shared GPU)
    slowdown: float = 1.0

    @property
    def known(self) -> bool:
        """True once both stages were timed: before that the scheduler admits by its stream limit alone."""
        return self.step.count > 0 and self.vocoder.count > 0

    def observe_steps(self, tokens: int, steps: int, seconds: float) -> None:
        """A round ran `steps` ODE steps of batches of `tokens` tokens (summed over groups) in `seconds`."""
        if steps > 0:
            self._track(self.step, tokens, seconds / steps)
            self.step.observe(tokens, seconds / steps)

    def observe_vocoder(self, frames: int, seconds: float) -> None:
        self._track(self.vocoder, frames, seconds)
        self.vocoder.observe(frames, seconds)

    def _track(self, line: LineFit, x: float, seconds: float) -> None:
        expected = line(x) if line.count else 0.0
        if expected > 0:
            ratio = seconds / expected
            self.slowdown = max(1.0, ratio if ratio > self.slowdown else 0.9 * self.slowdown + 0.1 * ratio)

    @property
    def stretch(self) -> float:
        return max(SAFETY, self.slowdown)

    def __str__(self) -> str:
        """The lines learnt, in the units of `scripts/pacing_sim.py`'s cost model (its flags take them)."""
        (step_base, step_per_token), (vocoder_base, vocoder_per_frame) = (self.step.coefficients(),
                                                                          self.vocoder.coefficients())
        return (f"one ODE step {step_base:.3g} s + {step_per_token:.3g} s a token ({self.step.count} rounds), "
                f"one vocoder call {vocoder_base:.3g} s + {vocoder_per_frame:.3g} s a frame ({self.vocoder.count} "
                f"calls), slowdown {self.slowdown:.2f}")

    def steps_seconds(self, tokens: int, steps: int) -> float:
        """`steps` ODE steps of one batch of `tokens` tokens."""
        return self.stretch * steps * self.step(tokens) if steps > 0 and tokens > 0 else 0.0

    def batch_seconds(self, chunks: Iterable[Chunk], steps_done: int = 0) -> float:
        """The chunks run together as one batch (a cohort) from step `steps_done` on, then vocoded in one call."""
        chunks = list(chunks)
        if not chunks:
            return 0.0
        steps = max(c.steps for c in chunks) - steps_done
        frames = sum(c.frames for c in chunks)
        return self.steps_seconds(sum(c.tokens for c in chunks), steps) + self.stretch * self.vocoder(frames)
