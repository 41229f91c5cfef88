"""pacing: the round-time fit against numpy's least squares, and a listener's deadline."""

from __future__ import annotations

import math

import numpy as np
import pytest

from f5_triton.pacing import SAFETY, Chunk, LineFit, Playback, WorkCost


@pytest.mark.parametrize("keep", [1.0, 0.9])
def test_line_fit_is_weighted_least_squares(keep):
    rng = np.random.default_rng(0)
    x = rng.uniform(1_000, 30_000, 40)
    y = 0.004 + 1.5e-6 * x + rng.normal(0, 2e-4, x.size)
    fit = LineFit(keep)
    for xi, yi in zip(x, y):
        fit.observe(xi, yi)
    weights = keep ** np.arange(x.size)[::-1]  # the newest observation weighs 1
    b, a = np.polyfit(x, y, 1, w=np.sqrt(weights))  # polyfit's w multiplies the residuals
    assert fit.coefficients() == pytest.approx((a, b), rel=1e-6)
    assert fit(20_000) == pytest.approx(a + b * 20_000, rel=1e-6)


def test_line_fit_of_one_size_or_a_negative_part_goes_through_the_origin():
    fit = LineFit()
    for _ in range(3):
        fit.observe(1000, 0.5)
    assert fit.coefficients() == pytest.approx((0.0, 0.5 / 1000))
    falling = LineFit(keep=1.0)
    for x, y in ((1000, 1.0), (2000, 0.5)):  # a negative slope: all of it per x instead
        falling.observe(x, y)
    a, b = falling.coefficients()
    assert a == 0 and b == pytest.approx((1000 * 1.0 + 2000 * 0.5) / (1000**2 + 2000**2))
    assert LineFit().coefficients() == (0.0, 0.0)


def test_playback_deadline_counts_audio_from_the_first_piece():
    playback = Playback()
    assert playback.deadline == math.inf
    playback.add(10.0, 0.0)  # an empty piece starts nothing
    assert playback.deadline == math.inf
    playback.add(11.0, 2.5)
    playback.add(12.0, 4.0)
    assert playback.deadline == 11.0 + 6.5


def test_work_cost_stretches_while_rounds_run_slower_than_their_line():
    cost = WorkCost()
    for tokens in (2_000, 8_000, 16_000):
        cost.observe_steps(tokens, 4, 4 * (0.002 + 1e-6 * tokens))
    cost.observe_vocoder(500, 0.01)
    assert cost.known and cost.slowdown == pytest.approx(1.0)
    chunk = Chunk(tokens=4_000, steps=16, frames=500)
    base = cost.batch_seconds([chunk])
    assert base == pytest.approx(SAFETY * (16 * (0.002 + 1e-6 * 4_000) + 0.01), rel=1e-6)
    assert cost.batch_seconds([chunk], steps_done=12) < base
    cost.observe_steps(4_000, 1, 3 * (0.002 + 1e-6 * 4_000))  # a round three times slower than its line
    assert cost.slowdown == pytest.approx(3.0, rel=1e-6) and cost.batch_seconds([chunk]) > 2 * base
    for _ in range(60):  # then rounds on their line again: the stretch falls back
        cost.observe_steps(4_000, 1, 0.002 + 1e-6 * 4_000)
    assert cost.slowdown < SAFETY
