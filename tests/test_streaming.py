"""Streaming: cross-faded pieces, in process and through the decoupled Triton model `f5_tts_streaming`."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from f5_triton import audio, text
from f5_triton.config import DEFAULT_STREAMING, PacingConfig
from f5_triton.pipeline import TTS, finish
from f5_triton.request import validate_request
from f5_triton.streaming import CrossFadeStream, StreamingSynthesizer, time_to_first_audio
from f5_triton.text import StreamingChunker

REF_TEXT = "Some call me nature, others call me mother nature."
LONG_TEXT = ("Hello there. This streaming test speaks several sentences, one chunk after another, and each "
             "of them is sent as soon as it is ready. The joins between the chunks are cross-faded, so nobody "
             "hears a click. Then the final chunk closes the stream.")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tts(tiny_ckpt):
    return TTS.from_paths(tiny_ckpt / "model.safetensors", tiny_ckpt / "vocab.txt", tiny_ckpt / "vocos")


@pytest.fixture(scope="module")
def streamer(tts):
    return StreamingSynthesizer(tts.stages(StreamingChunker()))


@pytest.fixture(scope="module")
def ref_wave(ref_en):
    wave, _ = sf.read(ref_en, dtype="float32")
    return wave


def chunk_waves(tts, prepared):
    """Each chunk generated alone (batch of one), as the streaming model does."""
    return [tts.vocoder(tts.flow_matching([job]))[0] for job in prepared.jobs]


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize("seconds", [0.15, 0.01, 0.0])
def test_cross_fade_stream_equals_cross_fade(seconds):
    rng = np.random.default_rng(0)
    fade = int(seconds * 24000)
    for _ in range(40):
        # lengths around the fade: shorter chunks, empty chunks, a short first chunk
        lengths = rng.choice([0, 1, fade // 2, fade, fade + 1, 3 * fade + 7, 9000], size=rng.integers(1, 6))
        waves = [rng.standard_normal(int(n)).astype(np.float32) for n in lengths]
        stream = CrossFadeStream(seconds)
        pieces = [stream.push(w) for w in waves] + [stream.flush()]
        expected = audio.cross_fade(waves, seconds) if len(waves) > 1 else waves[0]
        joined = np.concatenate(pieces)
        assert joined.dtype == np.float32
        np.testing.assert_array_equal(joined, expected)
        if len(waves) > 1 and seconds > 0:  # only the held-back tail waits for the flush
            assert len(pieces[-1]) == min(fade, len(expected))


def test_pieces_join_to_finish_of_the_streaming_chunks(tts, streamer, ref_wave):
    request = validate_request(ref_wave, REF_TEXT, LONG_TEXT, seed=11, nfe_steps=4)
    prepared = streamer.stages.preprocess(request)
    max_bytes = text.max_chunk_bytes(REF_TEXT, streamer.stages.preprocess.reference(request).seconds, 1.0)
    first_chunk_bytes = DEFAULT_STREAMING.first_chunk_bytes
    assert prepared.chunks == text.split_for_streaming(LONG_TEXT, first_chunk_bytes, max_chars=max_bytes)
    assert len(prepared.chunks) >= 3 and len(prepared.chunks[0].encode()) <= first_chunk_bytes
    pieces = list(streamer.stream(request))
    assert [p.chunk_index for p in pieces] == list(range(len(prepared.chunks)))
    assert [p.is_final for p in pieces] == [False] * (len(pieces) - 1) + [True]
    expected = finish(chunk_waves(tts, prepared), prepared.ref_rms)
    # bit-exact: the same chunks through the same arithmetic as upstream's cross_fade + level restore
    np.testing.assert_array_equal(np.concatenate([p.audio for p in pieces]), expected)


def test_first_piece_comes_before_the_last_chunk_is_generated(tts, streamer, ref_wave):
    events = []

    class RecordingFlowMatcher:
        def __call__(self, jobs, on_step=None):
            events.append(("generate", jobs[0].chunk_index))
            return tts.flow_matching(jobs, on_step)

    streamer = StreamingSynthesizer(dataclasses.replace(streamer.stages, flow_matching=RecordingFlowMatcher()))
    request = validate_request(ref_wave, REF_TEXT, LONG_TEXT, seed=1, nfe_steps=2)
    for piece in streamer.stream(request):
        events.append(("piece", piece.chunk_index))
    last = events[-1][1]
    assert events.index(("piece", 0)) < events.index(("generate", last))
    assert events == [(kind, i) for i in range(last + 1) for kind in ("generate", "piece")]


def test_time_to_first_audio_in_process(streamer, ref_wave):
    request = validate_request(ref_wave, REF_TEXT, LONG_TEXT, nfe_steps=2)
    runs = time_to_first_audio(streamer, request, repeats=1, warmup=0)
    assert len(runs) == 1
    run = runs[0]
    assert 0 < run.first_audio < run.total and run.pieces >= 3 and run.audio_seconds > 1
    assert run.real_time_factor > 0


def test_streaming_latency_script(tiny_ckpt, ref_en, tmp_path):
    """The script times the default and the opt-in first chunk on fewer steps in one run, and measures how far the
    option's audio is from the default's (same seed)."""
    out = tmp_path / "runs.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "streaming_latency.py"), "--ckpt-dir", str(tiny_ckpt),
         "--device", "cpu", "--nfe", "2", "--first-chunk-nfe-steps", "1", "--repeats", "2", "--warmup", "0",
         "--reference-audio", str(ref_en), "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for label in ("default: ", "first chunk on 1 steps: "):
        assert re.search(label + r"time to first audio: median [\d.]+ ms", result.stdout), result.stdout
    report = json.loads(out.read_text())
    for runs in (report["runs"], report["default_runs"]):
        assert len(runs) == 2 and all(0 < r["first_audio_s"] < r["total_s"] and r["audio_s"] > 20 for r in runs)
    assert report["first_piece_rel_l2"] > 0.01 and 0 < report["whole_rel_l2"] < report["first_piece_rel_l2"]


# --------------------------------------------------------------------------- continuous batching, in process


class RecordingSink:
    """A StreamSink that writes every call into a shared event list: (name, "piece", index, final) and so on."""

    def __init__(self, name, events):
        self.name, self.events, self.cancelled, self.pieces = name, events, False, []
        self.queued = None

    def wanted(self):
        return not self.cancelled

    def started(self, queued_seconds):
        self.queued = queued_seconds  # not an event: the tests here check the order of pieces

    def piece(self, piece):
        self.pieces.append(piece.audio)
        self.events.append((self.name, "piece", piece.chunk_index, piece.is_final))

    def dropped(self, sent, chunks):
        self.events.append((self.name, "dropped", sent, chunks))

    def failed(self, error):
        self.events.append((self.name, "failed", repr(error), None))


# The tests of round order: pacing (admission by playback deadline) would make it depend on this machine's speed.
UNPACED = PacingConfig(enabled=False)


def stream_requests(ref_wave):
    """Three requests of different lengths, seeds and NFE (rows at different steps share DiT calls), each
    of two chunks or more."""
    return {"long": validate_request(ref_wave, REF_TEXT, LONG_TEXT, seed=5, nfe_steps=6),
            "short": validate_request(ref_wave, REF_TEXT, "Short one, to start with. Then a second sentence ends it.", seed=6,
                                      nfe_steps=4),
            "middle": validate_request(ref_wave, REF_TEXT, LONG_TEXT[:160], seed=7, nfe_steps=5, speed=1.2)}


@pytest.fixture(scope="module")
def alone(streamer, ref_wave):
    """Each request of `stream_requests` streamed alone (the pre-scheduler path): its joined audio."""
    return {name: np.concatenate([p.audio for p in streamer.stream(r)]) for name, r in stream_requests(ref_wave).items()}


def run_all(scheduler):
    while scheduler.run_round():
        pass


def submit_all(streamer, ref_wave, granularity, events):
    """A scheduler holding every request of `stream_requests`, and their recording sinks by name."""
    from f5_triton.stream_scheduler import StreamScheduler

    scheduler = StreamScheduler(streamer, granularity=granularity, pacing=UNPACED)
    sinks = {}
    for name, request in stream_requests(ref_wave).items():
        sinks[name] = RecordingSink(name, events)
        scheduler.submit(request, sinks[name])
    return scheduler, sinks


@pytest.mark.parametrize("granularity", ["chunk", "cohort"])
def test_scheduled_streams_interleave_and_equal_their_audio_alone(streamer, ref_wave, alone, granularity):
    events = []
    scheduler, sinks = submit_all(streamer, ref_wave, granularity, events)
    run_all(scheduler)
    pieces = [e for e in events if e[1] == "piece"]
    assert len(pieces) == len(events)  # nothing dropped or failed
    first_final = next(i for i, e in enumerate(pieces) if e[3])
    # every stream had audio before any stream finished: they advance together, not one after another
    assert {e[0] for e in pieces[:first_final]} == set(alone)
    assert [e[2] for e in pieces if e[0] == "long"] == list(range(len(sinks["long"].pieces)))
    assert all(len(sink.pieces) >= 2 for sink in sinks.values())
    for name, expected in alone.items():
        joined = np.concatenate(sinks[name].pieces)
        assert joined.shape == expected.shape
        assert np.abs(joined - expected).max() <= 1e-4, name
    assert scheduler.active == scheduler.waiting == 0


def test_cohort_granularity_runs_a_newcomers_first_chunk_between_segments(streamer, ref_wave, alone):
    """A stream submitted while another's later chunk runs gets its first chunk at once, in rounds of its own: the
    running cohort waits after its current segment (one step on the CPU) and ends after the newcomer's piece."""
    from f5_triton.stream_scheduler import StreamScheduler

    events = []
    scheduler = StreamScheduler(streamer, granularity="cohort", pacing=UNPACED)
    requests = stream_requests(ref_wave)
    long_sink, short_sink = RecordingSink("long", events), RecordingSink("short", events)
    scheduler.submit(requests["long"], long_sink)
    rounds = 0
    while not long_sink.pieces:
        scheduler.run_round()
        rounds += 1
    assert rounds == requests["long"].nfe_steps  # one step a round: a first chunk alone takes NFE rounds
    scheduler.run_round()  # the long stream's second chunk: its first step
    scheduler.submit(requests["short"], short_sink)
    for _ in range(requests["short"].nfe_steps):
        scheduler.run_round()
    assert [e[:3] for e in events] == [("long", "piece", 0), ("short", "piece", 0)]
    run_all(scheduler)
    assert [e[0] for e in events[:3]] == ["long", "short", "long"]
    for name, sink in (("long", long_sink), ("short", short_sink)):
        assert np.abs(np.concatenate(sink.pieces) - alone[name]).max() <= 1e-4


def test_cohorts_of_later_chunks_start_together(streamer, ref_wave):
    """Streams whose first chunks ended in different cohorts wait for the running cohort of later chunks to end and
    then start their next chunks as one cohort: batches stay large."""
    from f5_triton.stream_scheduler import StreamScheduler

    scheduler = StreamScheduler(streamer, granularity="cohort", pacing=UNPACED)
    requests = stream_requests(ref_wave)
    sinks = {name: RecordingSink(name, []) for name in requests}
    began = []
    original = streamer.stages.flow_matching.begin
    streamer.stages.flow_matching.begin = lambda jobs: began.append(len(jobs)) or original(jobs)
    try:
        scheduler.submit(requests["long"], sinks["long"])
        while not sinks["long"].pieces:
            scheduler.run_round()
        scheduler.run_round()  # long's second chunk starts, alone
        scheduler.submit(requests["short"], sinks["short"])
        scheduler.submit(requests["middle"], sinks["middle"])
        run_all(scheduler)
    finally:
        del streamer.stages.flow_matching.begin
    # long's first, long's second, the two newcomers' first chunks together, then the later chunks together
    assert began[:4] == [1, 1, 2, 3]


def test_a_cohort_that_cannot_start_fails_its_streams_and_the_scheduler_goes_on(streamer, ref_wave, alone):
    from f5_triton.stream_scheduler import StreamScheduler

    events = []
    scheduler = StreamScheduler(streamer, granularity="cohort", pacing=UNPACED)
    requests = stream_requests(ref_wave)
    streamer.stages.flow_matching.begin = lambda jobs: (_ for _ in ()).throw(RuntimeError("CUDA out of memory"))
    try:
        scheduler.submit(requests["short"], RecordingSink("short", events))
        assert scheduler.run_round()
    finally:
        del streamer.stages.flow_matching.begin
    assert events == [("short", "failed", "RuntimeError('CUDA out of memory')", None)]
    assert scheduler.active == 0
    sink = RecordingSink("middle", events)
    scheduler.submit(requests["middle"], sink)
    run_all(scheduler)
    assert np.abs(np.concatenate(sink.pieces) - alone["middle"]).max() <= 1e-4


@pytest.mark.parametrize("granularity", ["chunk", "cohort"])
def test_cancelled_stream_leaves_while_the_others_go_on(streamer, ref_wave, alone, granularity):
    events = []
    scheduler, sinks = submit_all(streamer, ref_wave, granularity, events)
    while not sinks["long"].pieces:
        scheduler.run_round()
    sinks["long"].cancelled = True
    run_all(scheduler)
    dropped = [e for e in events if e[1] == "dropped"]
    assert len(dropped) == 1 and dropped[0][0] == "long" and 1 <= dropped[0][2] < dropped[0][3]
    assert not [e for e in events if e[0] == "long" and e[1] == "piece" and e[3]]  # no final piece
    for name in ("short", "middle"):
        assert np.abs(np.concatenate(sinks[name].pieces) - alone[name]).max() <= 1e-4


def test_first_chunks_go_first_when_a_round_is_full(streamer, ref_wave):
    from f5_triton.stream_scheduler import StreamScheduler

    events = []
    scheduler = StreamScheduler(streamer, granularity="chunk", max_rows=1, pacing=UNPACED)
    requests = stream_requests(ref_wave)
    scheduler.submit(requests["long"], RecordingSink("long", events))
    scheduler.run_round()
    scheduler.submit(requests["short"], RecordingSink("short", events))
    scheduler.run_round()
    scheduler.run_round()
    assert events == [("long", "piece", 0, False), ("short", "piece", 0, False), ("long", "piece", 1, False)]


def test_admission_limit_queues_then_refuses(streamer, ref_wave, alone):
    from f5_triton.errors import ServerBusyError
    from f5_triton.stream_scheduler import StreamScheduler

    events = []
    scheduler = StreamScheduler(streamer, granularity="chunk", max_streams=1, max_queued=1,
                                pacing=UNPACED)
    requests = stream_requests(ref_wave)
    sinks = {name: RecordingSink(name, events) for name in requests}
    scheduler.submit(requests["short"], sinks["short"])
    scheduler.submit(requests["middle"], sinks["middle"])
    with pytest.raises(ServerBusyError, match="2 streams held, the limit is 1 generated at once and 1 waiting; retry"):
        scheduler.submit(requests["long"], sinks["long"])
    scheduler.run_round()
    assert (scheduler.active, scheduler.waiting) == (1, 1)
    assert {e[0] for e in events} == {"short"}  # the queued stream has not started
    run_all(scheduler)
    # the waiting stream started only once the first had finished, and never more than one ran
    finals = [i for i, e in enumerate(events) if e[1] == "piece" and e[3]]
    assert events[finals[0]][0] == "short" and events[finals[0] + 1][0] == "middle"
    assert np.abs(np.concatenate(sinks["middle"].pieces) - alone["middle"]).max() <= 1e-4
    with pytest.raises(ValueError, match="granularity must be one of"):
        StreamScheduler(streamer, granularity="token")


# A short first piece (~2 s) before a long second chunk (~14 s): streams started together outrun their listeners.
PACED_TEXT = ("A short line opens it. The second part is a good deal longer than the first one, so a scheduler that "
              "batches every stream's second chunk together falls behind its listeners, who hear only the short "
              "opening line meanwhile.")


class TimedSink(RecordingSink):
    """A RecordingSink that also keeps when each piece came and how long it plays."""

    def __init__(self, name, events):
        super().__init__(name, events)
        self.timeline, self.done = [], threading.Event()

    def piece(self, piece):
        self.timeline.append((time.monotonic(), len(piece.audio) / 24000))
        super().piece(piece)
        if piece.is_final:
            self.done.set()

    def failed(self, error):
        super().failed(error)
        self.error, self.failed_at = error, time.monotonic()
        self.done.set()

    def stalls(self) -> list[float]:
        """How late each piece came for a listener who plays from the first piece on without pause."""
        start, played = self.timeline[0][0], 0.0
        late = []
        for arrived, seconds in self.timeline:
            late.append(max(0.0, arrived - (start + played)))
            played += seconds
        return late


def offer_streams(streamer, ref_wave, pacing, count, **limits):
    """`count` streams of PACED_TEXT submitted at once to a running scheduler (after a warm-up stream, so that the
    pacing knows this machine's speed); returns the scheduler and the sinks once every stream ended."""
    from f5_triton.config import DEFAULT_SAMPLING
    from f5_triton.stream_scheduler import StreamScheduler

    events = []
    sinks = [TimedSink(f"s{i}", events) for i in range(count)]
    with StreamScheduler(streamer, pacing=pacing, **limits) as scheduler:
        scheduler.warm_up(dataclasses.replace(DEFAULT_SAMPLING, nfe_steps=4))
        scheduler.submitted = time.monotonic()
        for i, sink in enumerate(sinks):
            scheduler.submit(validate_request(ref_wave, REF_TEXT, PACED_TEXT, seed=60 + i, nfe_steps=4), sink)
        for sink in sinks:
            assert sink.done.wait(300)
    return scheduler, sinks


def test_paced_streams_never_stall_and_the_excess_waits(streamer, ref_wave):
    """Eight streams offered at once, more than this machine keeps ahead of their listeners together (unpaced, they
    stall; eight rather than six: the admission bound follows the deadline-ordered cohorts and keeps six ahead
    together on a briefly idle host): the scheduler starts only as many as it can keep ahead, every piece of every
    stream comes before its listener runs out, and the others wait before their first audio. (A margin of 1 s: the
    CPU may be shared with other tests, whose load comes and goes faster than the scheduler's timing follows it; a
    GPU's rounds keep their time.)"""
    _, unpaced = offer_streams(streamer, ref_wave, PacingConfig(enabled=False), 8)
    assert max(max(sink.stalls()) for sink in unpaced) > 0.3  # all eight at once outrun their listeners here
    scheduler, sinks = offer_streams(streamer, ref_wave, PacingConfig(margin_seconds=1.0, queue_seconds=120), 8)
    assert scheduler.late_pieces == 0
    for sink in sinks:
        assert sink.events[-1][1:4:2] == ("piece", True) and len(sink.timeline) >= 3
        assert max(sink.stalls()) <= 0.05, (sink.name, sink.stalls())
    spans = [(scheduler.submitted + sink.queued, sink.timeline[-1][0]) for sink in sinks]
    peak = max(sum(begin <= t < end for begin, end in spans) for t, _ in spans)
    assert peak < len(sinks) and max(sink.queued for sink in sinks) > 0.5, (peak, [s.queued for s in sinks])
    assert scheduler.active == scheduler.waiting == 0


def test_a_stream_that_cannot_start_within_the_queue_limit_is_refused(streamer, ref_wave):
    """One stream generated at a time: the second waits, and is refused with the retriable `ServerBusyError` once
    the queue's limit has passed (never before), while the first goes on to its end."""
    from f5_triton.errors import ServerBusyError

    pacing = PacingConfig(queue_seconds=0.5)
    scheduler, (first, second) = offer_streams(streamer, ref_wave, pacing, 2, max_streams=1)
    assert first.events[-1][1:4:2] == ("piece", True) and second.timeline == [] and second.queued is None
    assert isinstance(second.error, ServerBusyError) and second.error.reason == "queue_timeout"
    assert "no stream could start within the queue's limit of 0.5 s" in str(second.error)
    assert pacing.queue_seconds <= second.failed_at - scheduler.submitted < first.timeline[-1][0] - scheduler.submitted


def test_scheduler_thread_streams_in_process(streamer, ref_wave, alone):
    from f5_triton.stream_scheduler import StreamScheduler

    requests = stream_requests(ref_wave)
    with StreamScheduler(streamer) as scheduler:
        joined = np.concatenate([p.audio for p in scheduler.stream(requests["short"])])
        assert np.abs(joined - alone["short"]).max() <= 1e-4
        pieces = scheduler.stream(requests["long"])
        assert len(next(pieces).audio) > 0
        pieces.close()  # leaves at the next round
        assert np.abs(np.concatenate([p.audio for p in scheduler.stream(requests["middle"])])
                      - alone["middle"]).max() <= 1e-4


def test_the_scheduler_runs_the_stages_its_synthesizer_was_given(tts, ref_wave):
    """One bundle, built once (here a flow matcher of its own over the tiny DiT and a chunker whose first chunk is
    shorter than the configuration's): the synthesizer and the scheduler over it hold that same object, and the
    scheduler's rounds cut, generate and vocode with it (its pieces are the synthesizer's, chunked its way)."""
    from f5_triton.config import StreamingConfig
    from f5_triton.pipeline import FlowMatcher, Preprocessor, Stages
    from f5_triton.stream_scheduler import StreamScheduler

    with pytest.raises(ValueError, match="first_chunk_bytes must be >= 1, got 0"):
        StreamingChunker(StreamingConfig(first_chunk_bytes=0))
    chunker = StreamingChunker(StreamingConfig(first_chunk_bytes=12))
    stages = Stages(Preprocessor(tts.preprocess.tokenizer, chunker=chunker), FlowMatcher(tts.flow_matching.model),
                    tts.vocoder)
    synthesizer = StreamingSynthesizer(stages)
    scheduler = StreamScheduler(synthesizer, granularity="cohort", pacing=UNPACED)
    assert scheduler.stages is synthesizer.stages is stages
    request = validate_request(ref_wave, REF_TEXT, "Hello there, you. A second sentence ends it.", seed=4, nfe_steps=2)
    max_bytes = text.max_chunk_bytes(REF_TEXT, stages.preprocess.reference(request).seconds, 1.0)
    chunks = text.split_for_streaming(request.target_text, 12, max_chars=max_bytes)
    assert chunks != text.split_for_streaming(request.target_text, DEFAULT_STREAMING.first_chunk_bytes, max_bytes)
    sink = RecordingSink("one", [])
    scheduler.submit(request, sink)
    run_all(scheduler)
    assert len(sink.pieces) == len(chunks) == 2
    alone = np.concatenate([p.audio for p in synthesizer.stream(request)])
    assert np.abs(np.concatenate(sink.pieces) - alone).max() <= 1e-4


def test_first_chunk_on_fewer_steps_is_opt_in_and_changes_only_the_first_chunk(streamer, ref_wave):
    """`first_chunk_nfe_steps` (off by default): a stream's first chunk runs on that many steps (upstream's EPSS grid
    at 5), exactly what the same chunk gives at a request's own 5 steps; every later chunk is the default's, in
    process and through the scheduler (from the third piece on: the second holds the first chunk's faded tail)."""
    from f5_triton.stream_scheduler import StreamScheduler

    assert DEFAULT_STREAMING.first_chunk_nfe_steps == 0 and streamer.first_chunk_nfe_steps == 0
    with pytest.raises(ValueError, match="first_chunk_nfe_steps must be 0 .off. or 1..64, got 65"):
        StreamingSynthesizer(streamer.stages, first_chunk_nfe_steps=65)
    fast = StreamingSynthesizer(streamer.stages, first_chunk_nfe_steps=5)
    request = validate_request(ref_wave, REF_TEXT, LONG_TEXT, seed=11, nfe_steps=7)
    jobs = fast.prepare(request).jobs
    assert len(jobs) >= 3 and jobs[0].nfe_steps == 5 and {job.nfe_steps for job in jobs[1:]} == {7}
    assert [job.nfe_steps for job in streamer.prepare(request).jobs] == [7] * len(jobs)
    got = [piece.audio for piece in fast.stream(request)]
    default = [piece.audio for piece in streamer.stream(request)]
    at_five = [piece.audio for piece in streamer.stream(dataclasses.replace(request, nfe_steps=5))]
    assert len(got) == len(default) == len(at_five) == len(jobs)
    np.testing.assert_array_equal(got[0], at_five[0])
    for piece, expected in zip(got[2:], default[2:]):
        np.testing.assert_array_equal(piece, expected)
    assert not np.array_equal(got[0], default[0])
    scheduler = StreamScheduler(fast, granularity="cohort", pacing=UNPACED)
    sink = RecordingSink("fast", [])
    scheduler.submit(request, sink)
    run_all(scheduler)
    assert len(sink.pieces) == len(got)
    assert np.abs(np.concatenate(sink.pieces) - np.concatenate(got)).max() <= 1e-4


def test_load_aware_first_chunk_is_opt_in_and_under_load_gives_the_whole_response_audio(tts, streamer, ref_wave):
    """`unsplit_at_load` (off by default): through the scheduler, whose submit passes the streams it holds, a stream
    that arrives while fewer are held is today's (a short first chunk split off), one that arrives with that many or
    more held is cut as whole responses are, and its joined pieces are the whole-response pipeline's audio for the
    same request and seed."""
    from f5_triton.stream_scheduler import StreamScheduler

    assert DEFAULT_STREAMING.unsplit_at_load == 0 and streamer.unsplit_at_load == 0
    with pytest.raises(ValueError, match="unsplit_at_load must be 0 .off. or a number of streams, got -1"):
        StreamingSynthesizer(streamer.stages, unsplit_at_load=-1)
    loaded = StreamingSynthesizer(streamer.stages, unsplit_at_load=2)
    requests = [validate_request(ref_wave, REF_TEXT, LONG_TEXT, seed=20 + i, nfe_steps=2) for i in range(3)]
    offline = tts.preprocess(requests[2])  # the whole-response model's cut: here two chunks
    split = streamer.prepare(requests[2]).chunks
    assert len(split) == len(offline.chunks) + 1 and split[2:] == offline.chunks[1:]  # today: the opening split off
    scheduler = StreamScheduler(loaded, granularity="cohort", pacing=UNPACED)
    sinks = [RecordingSink(str(i), []) for i in range(len(requests))]
    for request, sink in zip(requests, sinks):
        scheduler.submit(request, sink)  # held at submit: 0, 1 (below the setting), 2 (at it)
    run_all(scheduler)
    for request, sink in zip(requests[:2], sinks[:2]):
        today = [piece.audio for piece in streamer.stream(request)]
        assert len(sink.pieces) == len(today) == len(split)
        assert max(np.abs(got - expected).max() for got, expected in zip(sink.pieces, today)) <= 1e-4
    whole = tts.synthesize([requests[2]])[0]  # the whole-response pipeline: its chunks in one batch
    joined = np.concatenate(sinks[2].pieces)
    assert len(sinks[2].pieces) == len(offline.chunks) and joined.shape == whole.shape
    assert np.abs(joined - whole).max() <= 1e-4
    # in process, bit for bit: the whole response's jobs (chunks, seeds, steps), each chunk generated alone
    prepared = loaded.prepare(requests[2], held=3)
    assert [(j.tokens, j.duration, j.seed, j.nfe_steps) for j in prepared.jobs] == [
        (j.tokens, j.duration, j.seed, j.nfe_steps) for j in offline.jobs]
    np.testing.assert_array_equal(np.concatenate([p.audio for p in loaded.stream(requests[2], held=3)]),
                                  finish(chunk_waves(tts, offline), offline.ref_rms))
    # below the setting, or off (the default) at any load, the stream is cut as today, first-chunk steps included
    fast = StreamingSynthesizer(streamer.stages, first_chunk_nfe_steps=1, unsplit_at_load=2)
    assert [j.nfe_steps for j in fast.prepare(requests[0], held=1).jobs] == [1] + [2] * len(offline.chunks)
    assert [j.nfe_steps for j in fast.prepare(requests[0], held=2).jobs] == [2] * len(offline.chunks)
    assert streamer.prepare(requests[0], held=10**6).chunks == split


def test_the_output_cache_keys_on_the_chunking_a_stream_used(streamer, ref_wave):
    """A stream cut whole under load is replayed only to a stream cut the same way: below the setting the same
    request is generated (split) again, and the split stream's key does not depend on the setting."""
    from f5_triton.cache import LRUCache

    cache = LRUCache("output", 16, 2**30)
    loaded = StreamingSynthesizer(streamer.stages, output_cache=cache, unsplit_at_load=3)
    request = validate_request(ref_wave, REF_TEXT, LONG_TEXT, seed=31, nfe_steps=2)
    unsplit = list(loaded.stream(request, held=3))
    assert loaded.cached(request, held=2)[1] is None
    assert [p.chunk_index for p in loaded.cached(request, held=5)[1]] == [p.chunk_index for p in unsplit]
    split = list(loaded.stream(request, held=0))
    assert len(split) == len(unsplit) + 1 and loaded.cached(request, held=0)[1] is not None
    assert StreamingSynthesizer(streamer.stages, output_cache=cache).cached(request)[0] == loaded.cached(request)[0]


def test_warm_up_stream_takes_every_stage_and_leaves_nothing_behind(streamer):
    """The stream a server runs at load: a short first chunk and a longer one, so preprocessing, both kinds of
    cohort, the vocoder and the cross-fade all run; unseeded, so the output cache keeps nothing of it."""
    from f5_triton.config import SamplingConfig
    from f5_triton.stream_scheduler import QueueSink, StreamScheduler
    from f5_triton.streaming import warm_up_request

    request = warm_up_request(SamplingConfig(nfe_steps=2))
    jobs = streamer.stages.preprocess(request).jobs
    assert request.nfe_steps == 2 and request.seed is None
    assert len(jobs) == 2 and jobs[0].total_frames - jobs[0].ref_frames < jobs[1].total_frames - jobs[1].ref_frames
    with StreamScheduler(streamer) as scheduler:
        assert scheduler.warm_up(SamplingConfig(nfe_steps=2)) > 0
        assert scheduler.active == scheduler.waiting == 0
        assert streamer.cached(request)[1] is None
        sink = QueueSink()
        scheduler.submit(request, sink)  # and it serves on
        assert sink.queue.get(timeout=60).chunk_index == 0


# --------------------------------------------------------------------------- Triton


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_rendered_streaming_model(tiny_ckpt, tmp_path, target):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from conftest import rendered_settings
    from f5_triton.config import SchedulerConfig
    from f5_triton.repository import RepositoryOptions, render
    from f5_triton.request import INPUTS

    options = dict(target=target, ckpt=tiny_ckpt / "model.safetensors", vocab=tiny_ckpt / "vocab.txt",
                   vocoder=tiny_ckpt / "vocos", gpus=[0, 1], streaming_instances_per_device=2, first_chunk_bytes=40,
                   output_cache_entries=0, streaming_granularity="chunk", streaming_max_streams=5,
                   streaming_max_queued=7, unsplit_at_load=6)
    repo = render(RepositoryOptions(**options), tmp_path / "repo")
    config = text_format.Parse((repo / "f5_tts_streaming" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.model_transaction_policy.decoupled and config.backend == "python"
    assert [i.name for i in config.input] == [f.name for f in INPUTS]
    assert [o.name for o in config.output] == ["waveform", "is_final"]
    settings = rendered_settings(repo, "f5_tts_streaming")
    assert settings.streaming.first_chunk_bytes == 40 and settings.caches.output_cache_entries == 0
    assert settings.streaming.unsplit_at_load == 6  # the model passes it to its synthesizer
    assert settings.caches.reference_cache_entries == 128
    assert settings.scheduler == SchedulerConfig(granularity="chunk", max_streams=5, max_queued=7)
    group = config.instance_group[0]
    kinds = model_config_pb2.ModelInstanceGroup
    assert group.count == 2 and group.kind == (kinds.KIND_CPU if target == "cpu" else kinds.KIND_GPU)
    assert list(group.gpus) == ([] if target == "cpu" else [0, 1])
    assert (repo / "f5_tts_streaming" / "1" / "model.py").is_file()
    assert rendered_settings(repo, "preprocess").caches.reference_cache_mb == 64.0
    assert not (render(RepositoryOptions(**options, streaming=False), tmp_path / "plain") / "f5_tts_streaming").exists()


def stream_pieces(server, wave, target_text, **optional) -> list[np.ndarray]:
    from f5_triton.client import stream_synthesize

    return list(stream_synthesize(server.urls.grpc, wave, REF_TEXT, target_text, timeout=120, **optional))


@pytest.mark.server
def test_server_stream_equals_in_process(streaming_server, tts, streamer, ref_wave, metric_samples):
    audio_seconds = ("f5_tts_generated_audio_seconds_total", (("model", "f5_tts_streaming"),))
    before = metric_samples(streaming_server, "f5_tts_generated_audio_seconds").get(audio_seconds, 0)
    pieces = stream_pieces(streaming_server, ref_wave, LONG_TEXT, seed=21, nfe_steps=8, speed=1.1)
    request = validate_request(ref_wave, REF_TEXT, LONG_TEXT, seed=21, nfe_steps=8, speed=1.1)
    prepared = streamer.stages.preprocess(request)
    assert len(pieces) == len(prepared.chunks) >= 3
    expected = finish(chunk_waves(tts, prepared), prepared.ref_rms)
    joined = np.concatenate(pieces)
    assert joined.shape == expected.shape
    assert np.abs(joined - expected).max() < 1e-4  # another process, same code: float noise at most
    # one response per chunk; that each leaves as soon as its chunk is generated (not all at the end)
    # is shown without timings by test_cancelling_stops_generation_before_the_last_chunk
    after = metric_samples(streaming_server, "f5_tts_generated_audio_seconds")[audio_seconds]
    assert after - before == pytest.approx(len(joined) / 24000, rel=1e-3)


@pytest.mark.server
def test_cancelling_stops_generation_before_the_last_chunk(streaming_server, ref_wave, metric_samples):
    """The client cancels as soon as it holds the first piece; the server then stops early, which it
    could not if it generated every chunk before sending the first (deterministic, unlike timings)."""
    from f5_triton.client import stream_synthesize

    cancelled = ("f5_tts_rejected_requests_total", (("model", "f5_tts_streaming"), ("reason", "cancelled")))
    before = metric_samples(streaming_server, "f5_tts_rejected").get(cancelled, 0)
    pieces = stream_synthesize(streaming_server.urls.grpc, ref_wave, REF_TEXT, LONG_TEXT * 2, nfe_steps=16, timeout=120)
    assert len(next(pieces)) > 0
    pieces.close()  # stop_stream(cancel_requests=True)
    pattern = re.compile(r"request cancelled by the client after (\d+) of (\d+) pieces")
    deadline = time.monotonic() + 60
    while not (found := pattern.findall(Path(streaming_server.log_path).read_text())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert found, streaming_server.log_tail()
    sent, chunks = (int(v) for v in found[-1])
    assert 1 <= sent < chunks
    assert metric_samples(streaming_server, "f5_tts_rejected")[cancelled] == before + 1


@pytest.mark.server
def test_server_stream_rejects_bad_input(streaming_server, ref_wave):
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="speed: is 5.0; allowed range"):
        stream_pieces(streaming_server, ref_wave, "Too fast.", speed=5.0)
    with pytest.raises(InferenceServerException, match="target_text: is empty"):
        stream_pieces(streaming_server, ref_wave, "   ")


@pytest.mark.server
def test_client_grpc_streaming(streaming_server, ref_en, tmp_path):
    out = tmp_path / "streamed.wav"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "client_grpc.py"), "--streaming", "--server-url", streaming_server.urls.grpc,
         "--reference-audio", str(ref_en), "--reference-text", REF_TEXT, "--target-text", LONG_TEXT,
         "--seed", "4", "--output-audio", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"time to first audio: \d+ ms, \d+ pieces", result.stdout), result.stdout
    wave, rate = sf.read(out, dtype="float32")
    assert rate == 24000 and len(wave) > 24000


def start_stream(url, wave, target_text, events, name, first_piece=None, **optional):
    """A thread that streams one request and records ("name", piece number, is final) into `events`;
    `first_piece` (an Event) is set once it holds audio. Returns (thread, pieces list, errors list)."""
    import threading

    from f5_triton.client import stream_synthesize

    pieces, errors = [], []

    def run():
        try:
            for piece in stream_synthesize(url, wave, REF_TEXT, target_text, timeout=120, **optional):
                pieces.append(piece)
                events.append((name, len(pieces)))
                if first_piece is not None:
                    first_piece.set()
        except Exception as exc:
            errors.append(exc)
        events.append((name, "end"))
        if first_piece is not None:
            first_piece.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, pieces, errors


def streamed_alone(streamer, wave, target_text, **optional):
    request = validate_request(wave, REF_TEXT, target_text, **optional)
    return np.concatenate([p.audio for p in streamer.stream(request)])


NFE_TOGETHER = 4  # the long stream ends last by its chunk count, at any step count: few steps, little work


@pytest.mark.server
def test_server_streams_advance_together(streaming_server, streamer, ref_wave):
    """A long stream is running; two short ones sent after its first piece finish before it does (a server that
    streamed one request after another could not), and every stream's audio is its audio alone."""
    import threading

    events = []
    started = threading.Event()
    texts = {"long": (LONG_TEXT * 3, 31), "short1": ("Short one, to start with. Then a second sentence ends it.", 32),
             "short2": ("Another short one here. It also has two sentences.", 33)}
    runs = {"long": start_stream(streaming_server.urls.grpc, ref_wave, texts["long"][0], events, "long", started,
                                 seed=texts["long"][1], nfe_steps=NFE_TOGETHER)}
    assert started.wait(120)
    for name in ("short1", "short2"):
        runs[name] = start_stream(streaming_server.urls.grpc, ref_wave, texts[name][0], events, name,
                                  seed=texts[name][1], nfe_steps=NFE_TOGETHER)
    for thread, _, _ in runs.values():
        thread.join(300)
    assert all(not errors for _, _, errors in runs.values()), runs
    ends = [e[0] for e in events if e[1] == "end"]
    assert ends[-1] == "long", events
    for name, (target_text, seed) in texts.items():
        expected = streamed_alone(streamer, ref_wave, target_text, seed=seed, nfe_steps=NFE_TOGETHER)
        joined = np.concatenate(runs[name][1])
        assert joined.shape == expected.shape and np.abs(joined - expected).max() <= 1e-4, name


@pytest.mark.server
def test_server_cancelled_stream_leaves_the_others_going(streaming_server, streamer, ref_wave):
    import threading

    from f5_triton.client import stream_synthesize

    events = []
    started = threading.Event()
    other = start_stream(streaming_server.urls.grpc, ref_wave, LONG_TEXT, events, "other", started, seed=41,
                         nfe_steps=8)
    pieces = stream_synthesize(streaming_server.urls.grpc, ref_wave, REF_TEXT, LONG_TEXT * 2, nfe_steps=8, timeout=120)
    assert len(next(pieces)) > 0
    pieces.close()  # cancels this stream only
    other[0].join(300)
    assert not other[2] and events[-1] == ("other", "end")
    expected = streamed_alone(streamer, ref_wave, LONG_TEXT, seed=41, nfe_steps=8)
    assert np.abs(np.concatenate(other[1]) - expected).max() <= 1e-4


@pytest.mark.server
def test_server_admission_limit_refuses_with_unavailable(tiny_server, streamer, ref_wave, run_gateway, tmp_path,
                                                         metric_samples):
    """One stream at a time, one waiting: a third stream while the first runs is refused at once with a retriable
    status; the waiting one is refused the same way once the queue's limit (2 s) has passed; the gateway answers a
    stream it cannot start with 503 and Retry-After; the first stream ends exact, and a retry then succeeds (chunk
    granularity here)."""
    import threading

    from tritonclient.utils import InferenceServerException

    from f5_triton.client import is_refused
    from f5_triton.gateway import GatewayConfig

    with tiny_server(streaming=True, nfe_steps=4, streaming_granularity="chunk", streaming_max_streams=1,
                     streaming_max_queued=1, streaming_pacing=PacingConfig(queue_seconds=2.0),
                     output_cache_entries=0) as server:
        events = []
        started = threading.Event()
        first = start_stream(server.urls.grpc, ref_wave, LONG_TEXT * 3, events, "first", started, seed=51, nfe_steps=8)
        assert started.wait(120)
        waiting = start_stream(server.urls.grpc, ref_wave, "Waits, then is refused.", events, "waiting", nfe_steps=4)
        time.sleep(0.5)  # the second stream is queued
        # UNAVAILABLE on the server; a gRPC stream's error response carries only the message to the client
        with pytest.raises(InferenceServerException, match="server busy: 2 streams held, the limit is 1 generated "
                                                           "at once and 1 waiting; retry later") as refused:
            stream_pieces(server, ref_wave, "Refused.", nfe_steps=4)
        assert is_refused(refused.value)
        waiting[0].join(60)
        assert waiting[1] == [] and len(waiting[2]) == 1 and is_refused(waiting[2][0])
        assert "no stream could start within the queue's limit of 2 s" in str(waiting[2][0])
        voices = tmp_path / "voices"
        voices.mkdir()
        sf.write(voices / "nature.wav", ref_wave, 24000)
        (voices / "nature.txt").write_text(REF_TEXT + "\n")
        import requests

        with run_gateway(GatewayConfig(triton_url=server.urls.grpc, voices_dir=voices, timeout=60)) as url:
            for _ in range(2):  # fills the queue, then is refused at once
                answer = requests.post(f"{url}/v1/audio/speech", timeout=60, json={
                    "model": "f5-tts", "voice": "nature", "input": "Busy now.", "stream": True, "response_format": "pcm"})
                if answer.status_code == 503:
                    break
        assert answer.status_code == 503 and answer.headers["Retry-After"] == "2"
        assert answer.json()["error"]["code"] == "server_busy" and "retry later" in answer.json()["error"]["message"]
        first[0].join(300)
        assert not first[2]
        expected = streamed_alone(streamer, ref_wave, LONG_TEXT * 3, seed=51, nfe_steps=8)
        assert np.abs(np.concatenate(first[1]) - expected).max() <= 1e-4
        pieces = stream_pieces(server, ref_wave, "Accepted now.", nfe_steps=4)  # the retry succeeds
        assert sum(len(p) for p in pieces) > 0
        rejected = metric_samples(server, "f5_tts_rejected_requests_total")
        assert rejected[("f5_tts_rejected_requests_total", (("model", "f5_tts_streaming"), ("reason", "queue_timeout")))] >= 1
        queued = metric_samples(server, "f5_tts_queue_seconds")
        assert queued[("f5_tts_queue_seconds_count", (("model", "f5_tts_streaming"),))] >= 2


def check_streaming_rows(out_json, labels, concurrencies):
    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [(r["label"], r["concurrency"]) for r in rows] == [(l, c) for l in labels for c in concurrencies]
    for row in rows:
        extra = row["extra"]
        assert 0 < extra["first_audio_p50_s"] <= extra["first_audio_p90_s"] <= extra["first_audio_p99_s"]
        assert extra["first_audio_p50_s"] <= row["latency_p50_s"] and row["throughput_audio_s_per_s"] > 0
        # the clients' first requests (an opening burst) apart from the later ones, when there are later ones
        split = {"first_audio_opening_p90_s", "first_audio_later_p90_s"}
        assert split <= extra.keys() if row["concurrency"] < row["requests"] else not split & extra.keys()
        assert extra["stall_p90_s"] >= 0 and 0 <= extra["stalled_share"] <= 1


@pytest.mark.server
def test_benchmark_streaming_sweep_through_triton(streaming_server, tmp_path):
    out = tmp_path / "streaming.jsonl"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmark.py"), "--mode", "server", "--streaming", "--server-url",
         streaming_server.urls.grpc, "--concurrency", "1,2", "--num-requests", "2", "--nfe", "2", "--passes", "2",
         "--label", "tiny", "--output-json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"tiny paragraphs pass2\s+2\s+2\s+\d+", result.stdout), result.stdout
    check_streaming_rows(out, ["tiny paragraphs pass1", "tiny paragraphs pass2"], [1, 2])


def test_benchmark_streaming_in_process(tiny_ckpt, tmp_path):
    out, trace = tmp_path / "streaming.jsonl", tmp_path / "traces" / "chunk-nfe2-paragraphs-c2.json"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmark.py"), "--mode", "offline", "--streaming", "--ckpt-dir",
         str(tiny_ckpt), "--device", "cpu", "--concurrency", "2", "--num-requests", "2", "--nfe", "2",
         "--granularity", "chunk", "--output-json", str(out), "--profile", str(trace.parent), "--server-warmup",
         "--max-streams", "2"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    check_streaming_rows(out, ["chunk nfe2 paragraphs"], [2])
    # --profile: torch.profiler's trace of the row, with the scheduler's labels on its thread's host ops
    labels = {e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("cat") == "user_annotation"}
    assert {"stream_scheduler.flow_matching", "stream_scheduler.deliver", "stream_scheduler.vocode"} <= labels
    assert "gpu_idle" in json.loads(out.read_text())["extra"] and "no GPU activity" in result.stdout
    assert "server warm-up: ready after" in result.stdout  # the flow-matching warm-up and a warm-up stream
