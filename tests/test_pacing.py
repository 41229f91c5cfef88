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


def test_the_scheduler_logs_the_work_cost_it_learnt_when_it_closes(caplog):
    """The card's cost lines reach the server log at shutdown, in the units pacing_sim.py's flags take."""
    from f5_triton.pipeline import Stages
    from f5_triton.stream_scheduler import StreamScheduler
    from f5_triton.streaming import StreamingSynthesizer

    scheduler = StreamScheduler(StreamingSynthesizer(Stages(None, None, None)))
    with caplog.at_level("INFO", logger="f5_triton.stream_scheduler"):
        scheduler.close()  # nothing learnt: nothing to say
        assert not caplog.records
        scheduler.cost = _known_cost()
        scheduler.close()
    (record,) = caplog.records
    assert record.getMessage() == ("streaming work cost learnt from its rounds: one ODE step 0.001 s + 1e-06 s a token "
                                   "(3 rounds), one vocoder call 0.002 s + 2e-07 s a frame (2 calls), slowdown 1.00")


# --------------------------------------------------------------------------- the scheduler's admission bound

NOW, FADE = 100.0, 0.15


def _job(ref: int, generated: int):
    import torch

    from f5_triton.pipeline import Job

    return Job(request_index=0, chunk_index=0, ref_mel=torch.zeros(ref, 100), ref_frames=ref, tokens=[0] * 10,
               duration=ref + generated, seed=0, nfe_steps=16, cfg_strength=2.0, sway_sampling_coef=-1.0)


def _known_cost() -> WorkCost:
    """A WorkCost that learnt step = 1e-3 + 1e-6 x tokens and vocoder = 2e-3 + 2e-7 x frames (the smaller batch first,
    so that its stretch stays SAFETY)."""
    cost = WorkCost()
    for tokens in (1_000, 10_000, 20_000):
        cost.observe_steps(tokens, 4, 4 * (1e-3 + 1e-6 * tokens))
    for frames in (100, 5_000):
        cost.observe_vocoder(frames, 2e-3 + 2e-7 * frames)
    assert cost.stretch == SAFETY
    return cost


def _batch(*chunks: tuple[int, int]) -> float:
    """Hand count of a cohort of (ref, generated) chunks: 16 steps of both guidance rows, then the vocoder."""
    tokens, frames = sum(2 * (r + g) for r, g in chunks), sum(g for _, g in chunks)
    return SAFETY * (16 * (1e-3 + 1e-6 * tokens) + 2e-3 + 2e-7 * frames)


def _admission(candidate_first: tuple[int, int]):
    """A scheduler (margin 0) with four playing streams, each with one chunk of (ref, generated) frames left: A's
    listener runs out 0.1 s from now (300, 300), B, C, D's in 8 s (500, 1500); and a new stream E of two chunks,
    `candidate_first` then (300, 900). Returns the scheduler, E, and its `_fits` now."""
    from f5_triton.config import PacingConfig
    from f5_triton.pipeline import Prepared, Stages
    from f5_triton.stream_scheduler import QueueSink, StreamScheduler, _Stream
    from f5_triton.streaming import PieceMaker, StreamingSynthesizer

    # admission reads jobs, pieces and deadlines only: no stage runs
    synthesizer = StreamingSynthesizer(Stages(None, None, None), cross_fade_seconds=FADE)
    scheduler = StreamScheduler(synthesizer, pacing=PacingConfig(margin_seconds=0.0))
    scheduler.cost = _known_cost()

    def stream(order, chunks, deadline=None):
        prepared = Prepared([_job(*c) for c in chunks], ref_rms=0.1)
        s = _Stream(QueueSink(), prepared, PieceMaker(prepared, FADE), None, order, NOW)
        if deadline is not None:  # playing, its first chunk handed out
            s.pieces.add(np.zeros(24_000, dtype=np.float32))
            s.playback = Playback(started=deadline - 1.0, seconds=1.0)
        return s

    scheduler._active = [stream(0, [(300, 100), (300, 300)], NOW + 0.1)] + [
        stream(i, [(500, 100), (500, 1500)], NOW + 8.0) for i in (1, 2, 3)]
    candidate = stream(4, [candidate_first, (300, 900)])
    return scheduler, candidate, scheduler._fits(candidate, NOW)


def test_admission_follows_the_deadline_ordered_cohorts_and_admits_what_one_batch_per_level_refused():
    scheduler, candidate, fits = _admission((300, 150))
    first_piece = NOW + _batch((300, 150))
    due_e = first_piece + 150 * 256 / 24000 - FADE
    # the former bound: every stream's next chunk in one batch after the first chunks, before A's listener runs out
    assert first_piece + _batch((300, 300), *[(500, 1500)] * 3, (300, 900)) > NOW + 0.1
    # the rounds' schedule: A's chunk alone (with E's it would end too late for A), then E, B, C, D together
    assert first_piece + _batch((300, 300), (300, 900)) > NOW + 0.1
    a_done = first_piece + _batch((300, 300))
    assert a_done <= NOW + 0.1
    assert a_done + _batch((300, 900), *[(500, 1500)] * 3) <= min(due_e, NOW + 8.0)
    assert fits
    # the cohorts `_fits` followed are the ones the rounds form: `_later_group`'s, once E is playing
    a = scheduler._active[0]
    scheduler._active.remove(a)
    candidate.pieces.add(np.zeros(3600, dtype=np.float32))
    candidate.playback = Playback(started=NOW, seconds=1.0)
    scheduler._active.append(candidate)
    assert scheduler._later_group(NOW) == [candidate, *scheduler._active[:3]]


def test_admission_refuses_a_newcomer_whose_first_chunk_would_make_a_listener_run_out():
    scheduler, _, fits = _admission((300, 1200))
    # E's first chunk goes first; A's chunk, alone after it, would end after A's listener ran out
    assert NOW + _batch((300, 1200)) + _batch((300, 300)) > NOW + 0.1
    assert not fits
