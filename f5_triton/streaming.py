"""Streaming synthesis: a request's audio as a sequence of pieces, the first one as early as possible.

The target text is split by the preprocessor's chunker, a `text.StreamingChunker` (sentence-sized chunks, a short
first one); each chunk is generated (flow matching, then the vocoder) on its own and handed out at once. The
chunks are joined with upstream's linear cross-fade: the fade-out tail of each chunk is held back
until the next chunk arrives (`CrossFadeStream`), so that the concatenated pieces are exactly
`pipeline.finish(chunk_waves, ref_rms)` of the same chunks. The last piece carries `is_final`.

`StreamingSynthesizer` is what the Triton model `f5_tts_streaming` runs, and what tests and
`time_to_first_audio` run in process.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from f5_triton import audio, text
from f5_triton.cache import LRUCache, request_output_key
from f5_triton.config import (CROSS_FADE_SECONDS, DEFAULT_LIMITS, DEFAULT_SAMPLING, DEFAULT_STREAMING, SAMPLE_RATE,
                              SamplingConfig)
from f5_triton.guards import check_finite
from f5_triton.pipeline import Prepared, Preprocessor, Stages
from f5_triton.request import SynthesisRequest, validate_request


@dataclass(frozen=True)
class Piece:
    """One streamed piece of a request's audio."""

    audio: np.ndarray  # float32, 24 kHz, at the reference's level; may be empty
    chunk_index: int  # the text chunk whose generation released this piece
    chunks: int  # text chunks (and pieces) of the request

    @property
    def is_final(self) -> bool:
        """The request's audio ends with this piece."""
        return self.chunk_index == self.chunks - 1


class CrossFadeStream:
    """`audio.cross_fade` of chunks that arrive one at a time: `push` returns the audio that is
    final now, keeping the last `seconds` back to fade into the next chunk; `flush` returns the rest.

    The arithmetic is `cross_fade`'s (float64 fades, float32 out), so the pieces join to its result
    bit for bit.
    """

    def __init__(self, seconds: float = CROSS_FADE_SECONDS, sample_rate: int = SAMPLE_RATE):
        self.fade = int(seconds * sample_rate) if seconds > 0 else 0
        self._tail = np.zeros(0, dtype=np.float64)  # held back: min(fade, samples joined so far)

    def push(self, wave: np.ndarray) -> np.ndarray:
        wave = np.asarray(wave)
        if self.fade == 0:
            return wave.astype(np.float32, copy=False)
        tail = self._tail
        # cross_fade's overlap is min(fade, len(joined), len(next)); len(tail) == min(fade, len(joined))
        n = min(len(tail), len(wave))
        if n > 0:
            overlap = tail[-n:] * np.linspace(1, 0, n) + wave[:n] * np.linspace(0, 1, n)
            segment = np.concatenate([tail[:-n], overlap, wave[n:]])
        else:
            segment = np.concatenate([tail, wave])
        # Once anything was emitted the tail is `fade` long and the segment no shorter, so holding
        # back min(fade, len(segment)) holds back min(fade, len(joined)).
        cut = len(segment) - min(self.fade, len(segment))
        self._tail = segment[cut:].astype(np.float64, copy=False)
        return segment[:cut].astype(np.float32)

    def flush(self) -> np.ndarray:
        rest, self._tail = self._tail.astype(np.float32), np.zeros(0, dtype=np.float64)
        return rest


def _level(wave: np.ndarray, ref_rms: float) -> np.ndarray:
    """`pipeline.finish`'s level restore, on one piece (a per-sample scale, so piecewise is exact)."""
    return np.asarray(audio.restore_rms(wave, ref_rms), dtype=np.float32)


class PieceMaker:
    """A request's chunk waveforms, given in chunk order, -> its `Piece`s (cross-faded, at the reference's level)."""

    def __init__(self, prepared: Prepared, cross_fade_seconds: float = CROSS_FADE_SECONDS):
        self.ref_rms = prepared.ref_rms
        self.chunks = len(prepared.jobs)
        self.fader = CrossFadeStream(cross_fade_seconds)
        self.made: list[Piece] = []

    def add(self, wave: np.ndarray) -> Piece:
        """The piece that the next chunk's waveform releases."""
        index = len(self.made)
        out = self.fader.push(wave)
        if index == self.chunks - 1:
            out = np.concatenate([out, self.fader.flush()])
        piece = Piece(_level(out, self.ref_rms), index, self.chunks)
        self.made.append(piece)
        return piece


class StreamingSynthesizer:
    """Request -> `Piece`s, one per text chunk, each as soon as its chunk is generated.

    `stages`: the bundle it runs, whose preprocessor cuts texts for streams (built with a `text.StreamingChunker`;
    `TTS.stages(text.StreamingChunker())` in process). A `stream_scheduler.StreamScheduler` over this synthesizer
    runs the same bundle. `output_cache` (an `LRUCache`) replays the pieces of an earlier request with the same
    reference, text, parameters and explicit seed; requests without a seed are never cached.

    `unsplit_at_load` (opt-in, 0: off): a stream that arrives while that many streams or more are held (`held`, which
    its host passes: a scheduler's generated and waiting streams) is cut as whole responses are (`text.chunk_text`,
    the offline `Preprocessor`'s chunker), its first chunk on the request's own steps: its pieces join to the
    whole-response model's audio for the same seed (each chunk's noise is seeded by its index), and it costs one
    reference pass less in the DiT.
    """

    def __init__(self, stages: Stages, *, cross_fade_seconds: float = CROSS_FADE_SECONDS,
                 output_cache: LRUCache | None = None,
                 first_chunk_nfe_steps: int = DEFAULT_STREAMING.first_chunk_nfe_steps,
                 unsplit_at_load: int = DEFAULT_STREAMING.unsplit_at_load):
        if not 0 <= first_chunk_nfe_steps <= DEFAULT_LIMITS.max_nfe_steps:
            raise ValueError(f"first_chunk_nfe_steps must be 0 (off) or 1..{DEFAULT_LIMITS.max_nfe_steps}, "
                             f"got {first_chunk_nfe_steps}")
        if unsplit_at_load < 0:
            raise ValueError(f"unsplit_at_load must be 0 (off) or a number of streams, got {unsplit_at_load}")
        self.stages = stages
        self.cross_fade_seconds = cross_fade_seconds
        self.output_cache = output_cache
        self.first_chunk_nfe_steps = first_chunk_nfe_steps
        self.unsplit_at_load = unsplit_at_load

    @functools.cached_property
    def _whole_response(self) -> Preprocessor:
        return self.stages.preprocess.chunked_by(text.chunk_text)

    def cuts_whole(self, held: int) -> bool:
        """Whether a stream arriving while `held` streams are held is cut as a whole response (`unsplit_at_load`)."""
        return bool(self.unsplit_at_load) and held >= self.unsplit_at_load

    def _cutting(self, held: int) -> tuple[Preprocessor, int]:
        """How such a stream is cut and its first chunk run: the streaming preprocessor and `first_chunk_nfe_steps`,
        or the whole-response cut with the request's own steps (0)."""
        if self.cuts_whole(held):
            return self._whole_response, 0
        return self.stages.preprocess, self.first_chunk_nfe_steps

    def prepare(self, request: SynthesisRequest, held: int = 0) -> Prepared:
        """`request` preprocessed into its chunks' jobs as `_cutting(held)` says; the first one on fewer steps when
        that gives a first-chunk step count."""
        preprocess, first_steps = self._cutting(held)
        prepared = preprocess(request)
        first = prepared.jobs[0]  # a request has at least one chunk
        if 0 < first_steps < first.nfe_steps:
            prepared.jobs[0] = dataclasses.replace(first, nfe_steps=first_steps)
        return prepared

    def _output_key(self, request: SynthesisRequest, held: int) -> str | None:
        if self.output_cache is None or not self.output_cache.enabled:
            return None
        preprocess, first_steps = self._cutting(held)  # keyed by the cut used
        return request_output_key(request, chunker=preprocess.chunker, cross_fade_seconds=self.cross_fade_seconds,
                                  first_chunk_nfe_steps=first_steps)

    def stream(self, request: SynthesisRequest, on_step: Callable[[int], None] | None = None, *,
               held: int = 0) -> Iterator[Piece]:
        """Pieces of `request`'s audio, cut as `held` streams held say (`prepare`); the last has `is_final`.
        `on_step(i)` may raise to cancel."""
        key, cached = self.cached(request, held)
        if cached is not None:
            yield from cached
            return
        stages = self.stages
        prepared = self.prepare(request, held)
        pieces = PieceMaker(prepared, self.cross_fade_seconds)
        for job in prepared.jobs:
            mel = check_finite(stages.flow_matching([job], on_step=on_step))
            yield pieces.add(stages.vocoder(mel)[0])
        self.remember(key, pieces.made)

    def remember(self, key: str | None, pieces: list[Piece]) -> None:
        """Keep a finished request's pieces for replay (`key`: `cached`'s, None when not cached)."""
        if key is not None:
            self.output_cache.put(key, tuple(pieces), sum(p.audio.nbytes for p in pieces) + 64 * len(pieces))

    def cached(self, request: SynthesisRequest, held: int = 0) -> tuple[str | None, tuple[Piece, ...] | None]:
        """(output-cache key or None, the cached pieces of `request` cut as `held` streams held say, or None)."""
        key = self._output_key(request, held)
        return key, (None if key is None else self.output_cache.get(key))

    def synthesize(self, request: SynthesisRequest) -> np.ndarray:
        """The whole streamed audio, joined."""
        return np.concatenate([piece.audio for piece in self.stream(request)])


def warm_up_request(sampling: SamplingConfig = DEFAULT_SAMPLING) -> SynthesisRequest:
    """A synthetic request (a 3 s hum, two sentences) whose stream takes every stage: preprocessing, a short first
    chunk and a longer one, the vocoder, the cross-fade. A server streams it once at load, after its flow-matching
    warm-up, so that the first user's stream finds nothing cold. `sampling`: the server's defaults."""
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    hum = 0.1 * np.sin(2 * np.pi * 150 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    request = validate_request(hum.astype(np.float32), "A warm up of the server.",
                               "One. Two three four five six seven eight nine ten eleven twelve thirteen.",
                               sample_rate=SAMPLE_RATE, nfe_steps=sampling.nfe_steps,
                               cfg_strength=sampling.cfg_strength, speed=sampling.speed)
    request.sway_sampling_coef = sampling.sway_sampling_coef
    return request


@dataclass(frozen=True)
class Latency:
    """Timings of one streamed request, in seconds."""

    first_audio: float  # request start -> first non-empty piece
    total: float  # request start -> final piece
    audio_seconds: float
    pieces: int

    @property
    def real_time_factor(self) -> float:
        return self.total / self.audio_seconds if self.audio_seconds else float("inf")


def measure(streamer: StreamingSynthesizer, request: SynthesisRequest,
            synchronize: Callable[[], None] = lambda: None) -> Latency:
    """Stream `request` once and time it. Pass `torch.cuda.synchronize` on a GPU (pieces are already
    on the host, so this only matters for work the caller queued before)."""
    synchronize()
    start = time.perf_counter()
    first = None
    samples = count = 0
    for piece in streamer.stream(request):
        count += 1
        samples += len(piece.audio)
        if first is None and len(piece.audio):
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    return Latency(first_audio=total if first is None else first, total=total,
                   audio_seconds=samples / SAMPLE_RATE, pieces=count)


def time_to_first_audio(streamer: StreamingSynthesizer, request: SynthesisRequest, repeats: int = 5,
                        warmup: int = 2, synchronize: Callable[[], None] = lambda: None) -> list[Latency]:
    """`repeats` timed runs of `request` after `warmup` untimed ones (kernels, allocator, caches).

    Give the request a seed only if the output cache is off: a cached repeat measures the cache.
    """
    for _ in range(warmup):
        measure(streamer, request, synchronize)
    return [measure(streamer, request, synchronize) for _ in range(repeats)]
