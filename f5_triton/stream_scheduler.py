"""Continuous batching across streams: the active streams share batched DiT calls.

`StreamScheduler` holds the streams a host gave it (`submit`) and runs rounds, in a background thread
(`start`) or one at a time (`run_round`, for tests). Each round:

  1. streams whose sink no longer wants them (cancelled, past their deadline) leave; a stream that waited longer
     than the pacing's `queue_seconds` is refused (`ServerBusyError`, retriable); waiting streams are admitted,
     oldest first, up to `max_streams` active ones and while the pacing says every admitted stream stays ahead of
     its listener (below);
  2. batched flow matching, as the granularity says (at most `max_rows` chunks a batch, if set);
  3. the chunks that finished go through the vocoder in one call, and each stream gets its piece.

Granularity "cohort" (the default): chunks started together form a cohort; a round advances one cohort by one
segment (a CUDA graph's ODE steps where the engine replays graphs, else one step). The cohort of first chunks goes
first: a newcomer waits for one segment of the others' work, then its first chunk runs with the other newcomers'
alone; the other streams' next chunks start together once the running cohort of later chunks ends, so batches stay
large.

Granularity "chunk": a round is one whole chunk (all NFE steps) of every active stream, first chunks first; a new
stream waits for the running round to end, and its first chunk shares the next with every other stream's next
chunk. (A third, "step" granularity, one ODE step of every stream a round, measured slower than both and was
removed: docs/streaming.md.)

Pacing (`config.PacingConfig`, on by default): a listener plays a stream from its first piece without pause, so
each later piece is due before the audio already handed out has played (`pacing.Playback`). The scheduler learns
how long its rounds take (`pacing.WorkCost`) and admits a waiting stream only if, with its first chunk added, the
work standing before every stream's next piece (new first chunks, the running cohort of later chunks, then the
cohorts of later chunks as the rounds will form them, by deadline) still ends before that piece is due; otherwise the
stream waits before its first audio. In
cohort granularity, later chunks go before new first chunks once a listener's margin is down to one segment of
them, and a cohort of later chunks takes streams by deadline while it can still end before the earliest.

Both granularities give each stream exactly its audio alone (per-request noise, no padding in any sequence-wide
operation): the pieces are `StreamingSynthesizer.stream`'s.

Hosts see a stream through a `StreamSink`; the Triton model `f5_tts_streaming` is one host, `stream` (an
iterator of pieces) another, for the CLI, benchmarks and tests. Nothing here knows Triton.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from torch.profiler import record_function

from f5_triton.config import (DEFAULT_PACING, DEFAULT_SAMPLING, DEFAULT_SCHEDULER, SAMPLE_RATE, PacingConfig,
                              SamplingConfig)
from f5_triton.errors import ServerBusyError
from f5_triton.guards import check_finite
from f5_triton.pacing import Chunk, Playback, WorkCost
from f5_triton.pipeline import Job, Prepared, generated
from f5_triton.request import SynthesisRequest
from f5_triton.streaming import Piece, PieceMaker, StreamingSynthesizer, warm_up_request

log = logging.getLogger(__name__)

GRANULARITIES = ("cohort", "chunk")


class StreamSink(Protocol):
    """Where a stream's pieces go; called from the scheduler's thread."""

    def wanted(self) -> bool:
        """False once the client cancelled or the deadline passed: the stream then leaves."""

    def started(self, queued_seconds: float) -> None:
        """The stream was admitted after waiting `queued_seconds` since `submit`."""

    def piece(self, piece: Piece) -> None:
        """The stream's next piece (the last has `is_final`)."""

    def dropped(self, sent: int, chunks: int) -> None:
        """The stream left because `wanted` said no, after `sent` of its `chunks` pieces."""

    def failed(self, error: Exception) -> None:
        """Generation failed for this stream; no more calls follow."""


@dataclass(eq=False)
class _Stream:
    sink: StreamSink
    prepared: Prepared
    pieces: PieceMaker
    cache_key: str | None
    order: int  # admission order: older streams first when a round is full
    arrived: float  # time.monotonic() at submit
    cohort: "_Cohort | None" = field(default=None, repr=False)  # cohort granularity: the one running its chunk
    playback: Playback = field(default_factory=Playback)

    @property
    def job(self) -> Job:
        return self.prepared.jobs[len(self.pieces.made)]

    def chunk(self, index: int) -> Chunk:
        return chunk_of(self.prepared.jobs[index])

    @property
    def playing(self) -> bool:
        return self.playback.started is not None


def chunk_of(job: Job) -> Chunk:
    """A job's cost: its frames in both guidance rows (one without guidance), its steps, its generated frames."""
    rows = 2 if job.cfg_strength >= 1e-5 else 1  # sampler.prepare's test for guidance
    return Chunk(tokens=rows * job.total_frames, steps=job.nfe_steps, frames=job.duration - job.ref_frames)


@dataclass(eq=False)
class _Cohort:
    """Chunks started together (cohort granularity): their integrations, advanced a segment per round."""

    streams: list[_Stream]  # in job order
    jobs: list[Job]
    first: bool  # first chunks: these cohorts go before the others
    groups: list | None = None  # FlowMatcher.begin's (positions, Solving), made by its first round

    @property
    def done(self) -> bool:
        return self.groups is not None and all(solving.done for _, solving in self.groups)

    @property
    def steps_done(self) -> int:
        return 0 if self.groups is None else min(solving.index for _, solving in self.groups)

    @property
    def tokens(self) -> int:
        return sum(chunk_of(job).tokens for job in self.jobs)


class StreamScheduler:
    """Runs many streams of one `StreamingSynthesizer` together: its bundle of stages (`stages`, the same object),
    settings and output cache.

    max_streams: streams generated at once; max_queued: streams waiting beyond them (more are refused with
    `ServerBusyError`); max_rows: chunks per round (per cohort) at most (None: one per active stream); pacing:
    admission by playback deadline and the queue's time limit (module doc).
    """

    def __init__(self, synthesizer: StreamingSynthesizer, *, granularity: str = DEFAULT_SCHEDULER.granularity,
                 max_streams: int = DEFAULT_SCHEDULER.max_streams, max_queued: int = DEFAULT_SCHEDULER.max_queued,
                 max_rows: int | None = None, pacing: PacingConfig = DEFAULT_PACING):
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if max_streams < 1 or max_queued < 0 or (max_rows is not None and max_rows < 1):
            raise ValueError(f"need max_streams >= 1, max_queued >= 0, max_rows >= 1 or None;"
                             f" got {max_streams}, {max_queued}, {max_rows}")
        if pacing.margin_seconds < 0 or pacing.queue_seconds <= 0:
            raise ValueError(f"need pacing margin_seconds >= 0 and queue_seconds > 0; got {pacing}")
        self.synthesizer = synthesizer
        self.stages = synthesizer.stages
        self.granularity = granularity
        self.max_streams, self.max_queued, self.max_rows = max_streams, max_queued, max_rows
        self.pacing = pacing
        self.cost = WorkCost()
        self.late_pieces = 0  # pieces handed out after their listener ran out: stalls the pacing did not prevent
        self._segment_steps = 1  # ODE steps of the last segment a cohort advanced
        self._waiting: deque[_Stream] = deque()
        self._active: list[_Stream] = []
        self._orders = itertools.count()
        self._cohorts: dict[bool, _Cohort] = {}  # cohort granularity: the running one of first / later chunks
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    # ------------------------------------------------------------------ hosts

    def submit(self, request: SynthesisRequest, sink: StreamSink) -> None:
        """Take a validated request: it joins at the next round (or waits for a place).

        Runs preprocessing in the caller's thread, so bad input raises `InvalidInputError` here; raises
        `ServerBusyError` when `max_streams` streams run and `max_queued` wait. A request whose pieces are in
        the output cache gets them at once, here. The streams held now (generated and waiting) are the load the
        synthesizer cuts the text by (`StreamingSynthesizer.prepare`).
        """
        with self._changed:
            held = len(self._active) + len(self._waiting)
        key, cached = self.synthesizer.cached(request, held)
        if cached is not None:
            for piece in cached:
                sink.piece(piece)
            return
        prepared = self.synthesizer.prepare(request, held)
        with self._changed:
            held = len(self._active) + len(self._waiting)
            if held >= self.max_streams + self.max_queued:
                raise ServerBusyError(f"{held} streams held, the limit is {self.max_streams} generated at once and "
                                      f"{self.max_queued} waiting; retry later")
            self._waiting.append(_Stream(sink, prepared, PieceMaker(prepared, self.synthesizer.cross_fade_seconds),
                                         key, next(self._orders), time.monotonic()))
            self._changed.notify()

    def stream(self, request: SynthesisRequest) -> Iterator[Piece]:
        """`request`'s pieces as the rounds make them (needs `start`); closing the iterator early cancels it."""
        sink = QueueSink()
        self.submit(request, sink)
        try:
            while True:
                item = sink.queue.get()
                if isinstance(item, Exception):
                    raise item
                yield item
                if item.is_final:
                    return
        finally:
            sink.cancelled.set()

    def warm_up(self, sampling: SamplingConfig = DEFAULT_SAMPLING) -> float:
        """Stream `streaming.warm_up_request` (with the host's `sampling` defaults) to its end, so that the first
        user's stream finds no stage cold; returns its seconds. Needs `start`."""
        start = time.perf_counter()
        for _ in self.stream(warm_up_request(sampling)):
            pass
        self.late_pieces = 0  # its short first piece is no listener's
        return time.perf_counter() - start

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> "StreamScheduler":
        """Run rounds in a background thread while there are streams."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="stream-scheduler", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread after its round; streams still held are failed."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join()
        if self.cost.known:  # what the card's rounds cost: calibrates scripts/pacing_sim.py
            log.info("streaming work cost learnt from its rounds: %s", self.cost)
        for stream in [*self._active, *self._waiting]:
            stream.sink.failed(RuntimeError("the streaming scheduler was shut down"))
        self._active.clear()
        self._waiting.clear()

    def __enter__(self) -> "StreamScheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not (self._closing or self._active or self._waiting):
                    self._changed.wait()
                if self._closing:
                    return
            try:
                self.run_round()
            except Exception:  # a bug here must not kill the thread that serves every stream
                log.exception("streaming round failed")

    # ------------------------------------------------------------------ rounds

    def run_round(self) -> bool:
        """One round (see the module doc); False when there was nothing to do."""
        self._admit()
        if not self._active:
            return False
        if self.granularity == "cohort":
            cohort = self._next_cohort()
            rows = [stream for stream in cohort.streams if stream in self._active]
            work = lambda: self._cohort_round(cohort)  # noqa: E731
        else:
            rows = sorted(self._active, key=lambda s: (len(s.pieces.made) > 0, s.order))[: self.max_rows]
            work = lambda: self._chunk_round(rows)  # noqa: E731
        try:
            with record_function("stream_scheduler.flow_matching"):  # labels for `bench.gpu_idle_profile`
                finished = work()
            with record_function("stream_scheduler.deliver"):
                self._deliver(finished)
        except Exception as exc:  # the whole batched call failed: every stream in it fails
            for stream in rows:
                self._leave(stream)
                stream.sink.failed(exc)
        return True

    def _admit(self) -> None:
        with self._changed:
            now = time.monotonic()
            for stream in [s for s in self._waiting if not s.sink.wanted()]:
                self._waiting.remove(stream)
                stream.sink.dropped(0, len(stream.prepared.jobs))
            for stream in [s for s in self._active if not s.sink.wanted()]:
                self._active.remove(stream)
                stream.sink.dropped(len(stream.pieces.made), len(stream.prepared.jobs))
            for stream in [s for s in self._waiting if now - s.arrived > self.pacing.queue_seconds]:
                self._waiting.remove(stream)
                stream.sink.failed(ServerBusyError(
                    f"no stream could start within the queue's limit of {self.pacing.queue_seconds:g} s "
                    f"({len(self._active)} streams generated, {len(self._waiting)} waiting); retry later",
                    reason="queue_timeout"))
            while self._waiting and len(self._active) < self.max_streams and self._fits(self._waiting[0], now):
                stream = self._waiting.popleft()
                self._active.append(stream)
                stream.sink.started(now - stream.arrived)

    # ------------------------------------------------------------------ pacing

    def _paced(self) -> bool:
        return self.pacing.enabled and self.cost.known

    def _remaining(self, cohort: "_Cohort | None") -> float:
        """Seconds until `cohort` (running, or about to start) hands out its pieces."""
        if cohort is None:
            return 0.0
        return self.cost.batch_seconds([chunk_of(job) for job in cohort.jobs], cohort.steps_done)

    def _fits(self, candidate: _Stream, now: float) -> bool:
        """Whether `candidate` may start now: with it, every stream's every piece still comes before its listener
        runs out. The bound follows the schedule the rounds keep: the first chunks in hand (new ones with the
        candidate's), the running cohort of later chunks, then the cohorts of later chunks as `_later_group` forms
        them, by deadline (chunk granularity: every stream's next chunk in one round), each run as one batch."""
        if not self._paced() or not self._active:
            return True
        margin, fade = self.pacing.margin_seconds, self.synthesizer.cross_fade_seconds
        streams = [*self._active, candidate]
        running_first, running_later = self._cohorts.get(True), self._cohorts.get(False)
        fresh = [s for s in streams if not s.pieces.made and s.cohort is None]
        end = now + self._remaining(running_first) + self.cost.batch_seconds(s.chunk(0) for s in fresh)
        first_piece = end  # when every stream not yet playing gets its first piece, at the latest
        end += self._remaining(running_later)
        in_later = [] if running_later is None else [s for s in running_later.streams if s in self._active]
        if any(end > s.playback.deadline - margin for s in in_later):
            return False
        # each stream's next chunk not in hand, and when its listener runs out of what comes before that chunk
        position, due = {}, {}
        for s in streams:
            position[s] = len(s.pieces.made) + (0 if s.pieces.made and s.cohort is None else 1)
            due[s] = s.playback.deadline if s.playing else first_piece + s.chunk(0).audio_seconds - fade
            if s in in_later:  # its running chunk is handed out before the next one is due
                due[s] += s.chunk(position[s] - 1).audio_seconds - fade
        pending = [s for s in streams if position[s] < len(s.prepared.jobs)]
        while pending:
            if self.granularity == "cohort":
                group = self._deadline_group(pending, end, due.__getitem__, lambda s: s.chunk(position[s]))
            else:
                group = pending
            end += self.cost.batch_seconds(s.chunk(position[s]) for s in group)
            for s in group:
                if end > due[s] - margin:
                    return False
                due[s] += s.chunk(position[s]).audio_seconds - fade
                position[s] += 1
            pending = [s for s in pending if position[s] < len(s.prepared.jobs)]
        return True

    def _later_slack(self, now: float, group: list[_Stream]) -> float:
        """Seconds to spare before a listener of the later chunks (running, then the next cohort: `group`) would run
        out."""
        margin = self.pacing.margin_seconds
        running = self._cohorts.get(False)
        end = now + self._remaining(running)
        slack = min((s.playback.deadline - margin - end for s in (running.streams if running else ())
                     if s in self._active), default=float("inf"))
        if group:
            end += self.cost.batch_seconds(s.chunk(len(s.pieces.made)) for s in group)
            slack = min(slack, min(s.playback.deadline for s in group) - margin - end)
        return slack

    def _later_group(self, now: float) -> list[_Stream]:
        """The streams the next cohort of later chunks takes (paced: `_deadline_group` of the idle ones, once the
        running cohort of later chunks ends); every idle one, oldest first, when not paced."""
        idle = [s for s in self._active if s.cohort is None and s.pieces.made]
        if not self._paced():
            return sorted(idle, key=lambda s: s.order)[: self.max_rows]
        return self._deadline_group(idle, now + self._remaining(self._cohorts.get(False)),
                                    lambda s: s.playback.deadline, lambda s: s.chunk(len(s.pieces.made)))

    def _deadline_group(self, idle: list[_Stream], start: float, deadline: Callable[[_Stream], float],
                        chunk: Callable[[_Stream], Chunk]) -> list[_Stream]:
        """A cohort of later chunks starting at `start`: the idle streams by `deadline`, while the cohort (their
        `chunk`s) still ends before the earliest one, at least one. `_later_group` starts cohorts by it and `_fits`
        follows them with it."""
        idle = sorted(idle, key=deadline)
        group = idle[:1]
        due = deadline(idle[0]) - self.pacing.margin_seconds if idle else 0.0
        for stream in idle[1:]:
            if self.max_rows is not None and len(group) >= self.max_rows:
                break
            if start + self.cost.batch_seconds(chunk(s) for s in (*group, stream)) > due:
                break
            group.append(stream)
        return group

    # ------------------------------------------------------------------ rounds

    def _leave(self, stream: _Stream) -> None:
        with self._changed:
            if stream in self._active:
                self._active.remove(stream)

    def _chunk_round(self, streams: list[_Stream]) -> list[tuple[_Stream, object]]:
        """Every stream's next chunk, all NFE steps, in one batched flow-matching call."""
        jobs = [stream.job for stream in streams]
        owner = {id(job): stream for job, stream in zip(jobs, streams)}
        start = time.monotonic()
        mels = self.stages.flow_matching(jobs, keep=lambda job: owner[id(job)].sink.wanted())
        self.stages.flow_matching.synchronize()
        self.cost.observe_steps(sum(chunk_of(job).tokens for job in jobs), max(job.nfe_steps for job in jobs),
                                time.monotonic() - start)
        finished = []
        for stream, mel in zip(streams, mels):
            if mel is None:  # declined between two steps: it leaves at once
                self._leave(stream)
                stream.sink.dropped(len(stream.pieces.made), len(stream.prepared.jobs))
            else:
                finished.append((stream, mel))
        return finished

    def _next_cohort(self) -> _Cohort:
        """The cohort this round advances. First chunks go first (the running cohort of them, else a new one of the
        streams waiting for their first chunk), unless a listener of later chunks would run out within one segment
        of them (paced); then the running cohort of later chunks, else a new one (`_later_group`). A cohort's
        streams stay together until its chunks end, so a newcomer waits at most one segment of others' work, and
        every chunk runs in big batches (CUDA graphs where the engine has them)."""
        now = time.monotonic()
        fresh = [s for s in self._active if s.cohort is None and not s.pieces.made]
        first = self._cohorts.get(True)
        if first is None and fresh:
            first = self._start_cohort(sorted(fresh, key=lambda s: s.order)[: self.max_rows], first=True)
        group = self._later_group(now)  # the next cohort of later chunks, once the running one (if any) ends
        if first is not None and not self._later_due(first, now, group):
            return first
        later = self._cohorts.get(False)
        if later is None:
            later = self._start_cohort(group, first=False) if group else None
        if later is not None:
            return later
        if first is not None:
            return first
        raise RuntimeError("active streams but no cohort to run")  # every active stream is in one or idle

    def _later_due(self, first: _Cohort, now: float, group: list[_Stream]) -> bool:
        """Whether later chunks must run before `first`'s next segment to keep their listeners ahead."""
        if not self._paced():
            return False
        segment = self.cost.steps_seconds(first.tokens, self._segment_steps)
        return self._later_slack(now, group) < segment

    def _start_cohort(self, streams: list[_Stream], first: bool) -> _Cohort:
        cohort = _Cohort(streams, [stream.job for stream in streams], first)
        for stream in streams:
            stream.cohort = cohort
        self._cohorts[first] = cohort
        return cohort

    def _cohort_round(self, cohort: _Cohort) -> list[tuple[_Stream, object]]:
        """One segment of `cohort`'s integrations (a CUDA graph's steps, else one step); its chunks once it ends."""
        if not any(stream in self._active for stream in cohort.streams):  # all cancelled: stop its work now
            self._end(cohort)
            return []
        try:
            if cohort.groups is None:  # noise and text embeddings: in the round, whose failure fails its streams
                with record_function("stream_scheduler.begin"):
                    cohort.groups = self.stages.flow_matching.begin(cohort.jobs)
                    self.stages.flow_matching.synchronize()
            start, steps = time.monotonic(), 0
            for _, solving in cohort.groups:
                if not solving.done:
                    segment = solving.segment
                    solving.advance(segment)
                    steps = max(steps, segment)
            self.stages.flow_matching.synchronize()
            self.cost.observe_steps(cohort.tokens, steps, time.monotonic() - start)
            self._segment_steps = steps or self._segment_steps
        except Exception:
            self._end(cohort)
            raise
        if not cohort.done:
            return []
        self._end(cohort)
        finished = []
        for members, solving in cohort.groups:
            for position, mel in zip(members, solving.result()):
                stream = cohort.streams[position]
                if stream in self._active:  # else it left (cancelled) while its cohort ran
                    finished.append((stream, generated(cohort.jobs[position], mel)))
        return finished

    def _end(self, cohort: _Cohort) -> None:
        self._cohorts.pop(cohort.first, None)
        for stream in cohort.streams:
            stream.cohort = None

    def _deliver(self, finished: list[tuple[_Stream, object]]) -> None:
        """Vocode the finished chunks in one call and send each stream its piece."""
        good = []
        for stream, mel in finished:
            try:
                check_finite([mel])
                good.append((stream, mel))
            except Exception as exc:
                self._leave(stream)
                stream.sink.failed(exc)
        if not good:
            return
        with record_function("stream_scheduler.vocode"):
            start = time.monotonic()
            waves = self.stages.vocoder([mel for _, mel in good])
            now = time.monotonic()
            self.cost.observe_vocoder(sum(mel.shape[0] for _, mel in good), now - start)
        for (stream, _), wave in zip(good, waves):
            piece = stream.pieces.add(wave)
            if now > stream.playback.deadline:
                self.late_pieces += 1
                log.warning("a stream's piece %d came %.3f s after its listener ran out", piece.chunk_index,
                            now - stream.playback.deadline)
            stream.playback.add(now, len(piece.audio) / SAMPLE_RATE)
            try:
                stream.sink.piece(piece)
            except Exception as exc:  # the host could not send it: this stream ends, the others go on
                self._leave(stream)
                stream.sink.failed(exc)
                continue
            if piece.is_final:
                self._leave(stream)
                self.synthesizer.remember(stream.cache_key, stream.pieces.made)


class QueueSink:
    """A `StreamSink` for in-process hosts: pieces and the error, if any, in `queue`; set `cancelled` to stop."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    def wanted(self) -> bool:
        return not self.cancelled.is_set()

    def started(self, queued_seconds: float) -> None:
        pass

    def piece(self, piece: Piece) -> None:
        self.queue.put(piece)

    def dropped(self, sent: int, chunks: int) -> None:
        self.queue.put(StreamDropped(f"stream stopped after {sent} of {chunks} pieces"))

    def failed(self, error: Exception) -> None:
        self.queue.put(error)


class StreamDropped(RuntimeError):
    """An in-process stream was cancelled."""
