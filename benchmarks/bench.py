"""Benchmark helpers: input sets, timing, statistics, reports and plots (used by benchmark.py).

RTF = processing seconds / generated audio seconds; throughput = generated audio seconds per
wall-clock second. Offline mode times each pipeline stage in process; server mode sends requests
to a running Triton (gRPC or HTTP) at a given concurrency and reads per-model compute time from
Triton's statistics.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

import numpy as np

from f5_triton.config import SAMPLE_RATE

BUILTIN_REF_TEXT = "Some call me nature, others call me mother nature."
BUILTIN_TARGETS = [
    "I don't really care what you call me. I've been a silent spectator, watching species evolve, empires rise "
    "and fall.",
    "But always remember, I am mighty and enduring. Respect me and I'll nurture you; ignore me and you shall "
    "face the consequences.",
    "The quick brown fox jumps over the lazy dog, and then it runs all the way back home before the sun goes down.",
    "Benchmarks should use realistic lengths, so this sentence asks for about ten seconds of speech in total.",
]


def add_engine_args(parser) -> None:
    """Options that pick the weights, device, precision and engines of an in-process pipeline; their names are the
    model parameters' (`EngineConfig.from_settings`)."""
    from f5_triton.config import DTYPES
    from f5_triton.engines import ENGINE_ALIASES, ENGINE_KINDS, EngineConfig

    group = parser.add_argument_group("engines")
    group.add_argument("--random-weights", metavar="ARCH", help="random weights of this architecture (timing only)")
    group.add_argument("--device", default=None, help="cuda when a GPU is visible, else cpu")
    group.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default fp16 on GPU")
    group.add_argument("--dit-engine", "--backend-type", dest="dit_engine", default=EngineConfig.kind,
                       choices=[*ENGINE_KINDS, *ENGINE_ALIASES],
                       help="engine of the DiT step (upstream's names accepted: pytorch, trt)")
    group.add_argument("--dit-engine-path", help=".onnx / .plan of the DiT step")
    group.add_argument("--vocoder-engine", default=EngineConfig.kind, choices=ENGINE_KINDS)
    group.add_argument("--vocoder-engine-path", help=".onnx / .plan of the vocoder")
    group.add_argument("--compile", dest="dit_compile", action="store_true",
                       help="torch engine: torch.compile the DiT step")
    group.add_argument("--cuda-graphs", dest="dit_cuda_graphs", action="store_true",
                       help="torch engine: CUDA graphs per frame bucket")
    group.add_argument("--graph-steps", dest="dit_graph_steps", type=int, default=EngineConfig.graph_steps,
                       help="with --cuda-graphs: ODE steps per graph replay (0 = a graph per DiT call)")
    group.add_argument("--graph-max-rows", dest="dit_graph_max_rows", type=int, default=EngineConfig.graph_max_rows,
                       help="with --cuda-graphs: DiT batches of more rows (2 per request) run without graphs")
    group.add_argument("--graph-max-tokens", dest="dit_graph_max_tokens", type=int,
                       default=EngineConfig.graph_max_tokens,
                       help="with --cuda-graphs: packed DiT batches of up to this many tokens (2 per frame of a "
                            "request) replay graphs too (0 = none; build_model_repo.py's default is larger)")


def tts_from_args(args):
    """(TTS, dtype name) for `add_engine_args` + `model_paths.add_model_args` options."""
    import tempfile

    import torch

    from f5_triton.engines import EngineConfig, make_dit_runner, make_vocoder_runner, torch_dtype
    from f5_triton.pipeline import TTS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("fp16" if device.startswith("cuda") else "fp32")
    dit, vocoder = (EngineConfig.from_settings(vars(args), network, device) for network in ("dit", "vocoder"))
    if args.random_weights:
        from f5_triton.checkpoints import make_random_checkpoint

        folder = make_random_checkpoint(tempfile.mkdtemp(prefix="f5-bench-"), args.random_weights, args.vocab,
                                        vocoder_small=False)
        ckpt, vocab, vocoder_dir = folder / "model.safetensors", folder / "vocab.txt", folder / "vocos"
    else:
        from f5_triton.model_paths import resolve_model_paths

        ckpt, vocab, vocoder_dir = resolve_model_paths(args)
    tts = TTS.from_paths(ckpt, vocab, vocoder_dir, arch=args.arch, device=device, dtype=torch_dtype(dtype_name),
                         engine=lambda model: make_dit_runner(model, dit),
                         vocoder_engine=lambda decoder: make_vocoder_runner(decoder, vocoder))
    return tts, dtype_name


@dataclass
class Item:
    """One benchmark input: reference audio, its transcript, the text to speak."""

    wave: np.ndarray
    sample_rate: int
    reference_text: str
    target_text: str
    name: str = ""


# fp16 production path (compiled, CUDA graphs, FA4, packed) vs the fp32 eager reference, same seeds: the largest
# relative L2 error allowed per request, of its mel and of its waveform (tests/test_gpu_lane.py, the GPU lane's
# server test, scripts/bench_vs_upstream.py --max-rel-l2). fp16's unit roundoff is 2^-11 = 4.9e-4; rounding errors
# that add up as a random walk over the DiT's 22 layers x 16 ODE steps x 2 guidance rows grow by sqrt(704) = 26.5,
# about 0.013. Measured on the H200 (docs/benchmarks.md): 0.0035 at batch 1 and 0.0072 at 16 requests. The bound
# is 1.5x the estimate, 2.8x the worst measurement; to be tightened after the GPU lane's first runs.
FP16_MEL_REL_L2 = 0.02
FP16_WAVE_REL_L2 = 0.02


def rel_l2(got, expected) -> float:
    """|got - expected| / |expected| (L2 norms) over their common length."""
    got, expected = np.asarray(got, dtype=np.float64).reshape(-1), np.asarray(expected, dtype=np.float64).reshape(-1)
    n = min(len(got), len(expected))
    return float(np.linalg.norm(got[:n] - expected[:n]) / np.linalg.norm(expected[:n]))


def synthetic_reference(seconds: float, sample_rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Speech-like noise (syllable-rate amplitude modulation) when no real reference is at hand."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4.0 * t)) * (t > 0.1) * (t < seconds - 0.1)
    carrier = np.sin(2 * np.pi * 140 * t) + 0.3 * rng.standard_normal(t.shape)
    return (0.1 * envelope * carrier).astype(np.float32)


def builtin_items(count: int, ref_audio: str | None = None, ref_seconds: float = 5.0,
                  gen_ratio: float = 2.0) -> list[Item]:
    """`count` items: a ~5 s reference and texts sized to generate ~gen_ratio x its length."""
    from f5_triton.audio import read_audio

    if ref_audio:
        wave, rate = read_audio(ref_audio)
        ref_text = BUILTIN_REF_TEXT
    else:
        wave, rate = synthetic_reference(ref_seconds), SAMPLE_RATE
        ref_text = BUILTIN_REF_TEXT
    target_bytes = int(len(ref_text.encode()) * gen_ratio * (ref_seconds * rate / len(wave) if ref_audio else 1.0))
    items = []
    for i in range(count):
        base = " ".join(BUILTIN_TARGETS[(i + k) % len(BUILTIN_TARGETS)] for k in range(4))
        text = base.encode()[:target_bytes].decode("utf-8", "ignore").rsplit(" ", 1)[0] + "."
        items.append(Item(wave, rate, ref_text, text, name=f"builtin-{i}"))
    return items


# The mixed-length set: what real clients send (issue 17). Each item's reference and target lengths are
# drawn uniformly from these ranges, from a generator seeded by (MIXED_SET_SEED, item index), so the
# set is the same on every machine and its first n items do not depend on how many are asked for.
MIXED_SET_SEED = 17
MIXED_REFERENCE_SECONDS = (3.0, 10.0)
MIXED_TARGET_SECONDS = (2.0, 20.0)
SPEECH_BYTES_PER_SECOND = 14.0  # English speech, UTF-8 bytes of transcript per second (transcript sizes only)


def _words(byte_count: int, rng: np.random.Generator) -> str:
    """About `byte_count` bytes of the built-in texts' words, no punctuation but a final full stop: one
    sentence, so the pipeline keeps it as one chunk (one job of the intended length)."""
    vocabulary = [w.strip(".,;:!?'").lower() for text in BUILTIN_TARGETS for w in text.split()]
    words: list[str] = []
    while len(" ".join(words)) + 1 < byte_count:
        words.append(vocabulary[int(rng.integers(len(vocabulary)))])
    return " ".join(words)[: max(1, byte_count - 1)].rstrip() + "."


def mixed_items(count: int, seed: int = MIXED_SET_SEED) -> list[Item]:
    """`count` items of mixed lengths: references of 3-10 s (synthetic speech-like audio, transcripts sized
    for it) and texts that make the duration estimate ask for 2-20 s of speech, each uniformly drawn."""
    items = []
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        ref_seconds = float(rng.uniform(*MIXED_REFERENCE_SECONDS))
        target_seconds = float(rng.uniform(*MIXED_TARGET_SECONDS))
        ref_text = _words(round(ref_seconds * SPEECH_BYTES_PER_SECOND), rng)
        # the pipeline's estimate: generated frames = reference frames x target bytes / reference bytes
        target_bytes = round(len(ref_text.encode()) * target_seconds / ref_seconds)
        items.append(Item(synthetic_reference(ref_seconds, seed=seed * 1000 + i), SAMPLE_RATE, ref_text,
                          _words(target_bytes, rng), name=f"mixed-{i}"))
    return items


# The paragraphs set: texts of one short sentence to a long paragraph (about 2 to 25 s of speech) with the
# uniform set's reference, several sentences each, so that streaming has pieces to send and streams of
# different lengths share the scheduler's batched rounds.
PARAGRAPHS = [
    "Hello, how can I help you today?",
    BUILTIN_TARGETS[0],
    " ".join(BUILTIN_TARGETS[1:3]),
    " ".join(BUILTIN_TARGETS),
    " ".join(BUILTIN_TARGETS[2:] + BUILTIN_TARGETS[:2] + BUILTIN_TARGETS[1:3]),
]


def paragraph_items(count: int, ref_audio: str | None = None) -> list[Item]:
    """`count` items cycling through `PARAGRAPHS` with the uniform set's first reference."""
    base = builtin_items(1, ref_audio)[0]
    return [Item(base.wave, base.sample_rate, base.reference_text, PARAGRAPHS[i % len(PARAGRAPHS)],
                 name=f"paragraph-{i}") for i in range(count)]


BUILTIN_SETS = ("uniform", "mixed", "paragraphs")


def builtin_set(name: str, count: int, ref_audio: str | None = None) -> list[Item]:
    """benchmark.py's built-in sets: "uniform" (every request ~5 s reference, ~10 s target; `ref_audio`
    replaces the synthetic reference), "mixed" (`mixed_items`) or "paragraphs" (`paragraph_items`)."""
    if name == "mixed":
        return mixed_items(count)
    if name == "paragraphs":
        return paragraph_items(count, ref_audio)
    if name == "uniform":
        items = builtin_items(4, ref_audio)
        return [items[i % len(items)] for i in range(count)]
    raise ValueError(f"unknown built-in set {name!r}; known: {BUILTIN_SETS}")


@dataclass(frozen=True)
class DitWork:
    """The DiT work of some requests' chunks (jobs), summed: what a chunking costs, whatever the card."""

    requests: int = 0
    chunks: int = 0
    tokens: int = 0  # the linear term: Σ over chunks of tokens per ODE step (both guidance rows) × steps
    attention: int = 0  # the attention term: Σ over chunks of rows × sequence length² × steps
    flops: float = 0.0  # both terms weighted as in one step of `arch` (`dit_step_flops`), × steps
    audio_seconds: float = 0.0  # the audio the chunks give, cross-faded as a request's chunks are

    def __add__(self, other: "DitWork") -> "DitWork":
        return DitWork(*(a + b for a, b in zip(astuple(self), astuple(other))))


def dit_work(jobs, arch: str = "F5TTS_v1_Base") -> DitWork:
    """The DiT work of one request's jobs (`pipeline.Prepared.jobs`): each chunk's sequence is the reference's frames
    and its own, in both guidance rows, for all its ODE steps (`stream_scheduler.chunk_of`)."""
    from f5_triton.audio import cross_fade
    from f5_triton.config import ARCHITECTURES, HOP_LENGTH
    from f5_triton.stream_scheduler import chunk_of

    config = ARCHITECTURES[arch]
    tokens = attention = flops = 0
    for job in jobs:
        chunk, length = chunk_of(job), job.total_frames
        rows = chunk.tokens // length
        tokens += chunk.tokens * chunk.steps
        attention += rows * length * length * chunk.steps
        flops += dit_step_flops(config, chunk.tokens, length) * chunk.steps
    samples = len(cross_fade([np.zeros((job.total_frames - job.ref_frames) * HOP_LENGTH) for job in jobs]))
    return DitWork(1, len(jobs), tokens, attention, flops, samples / SAMPLE_RATE)


def chunking_work(items: list[Item], nfe_steps: int, cfg_strength: float, streaming=None,
                  vocab: str | Path | None = None) -> tuple[DitWork, DitWork]:
    """(whole, streamed): the DiT work of `items` as the whole-response model cuts them (`text.chunk_text` within
    the request's max bytes: the preprocess model's `Preprocessor`) and as a stream does (`StreamingSynthesizer.prepare`
    with a `text.StreamingChunker` of `streaming`, default the served `StreamingConfig`). CPU only, no weights: token
    counts do not depend on the vocab's contents (an unknown token still counts one), so `vocab` may be omitted."""
    from f5_triton.config import DEFAULT_STREAMING
    from f5_triton.pipeline import Preprocessor, Stages
    from f5_triton.request import validate_request
    from f5_triton.streaming import StreamingSynthesizer
    from f5_triton.text import StreamingChunker, Tokenizer

    streaming = streaming or DEFAULT_STREAMING
    whole = Preprocessor(Tokenizer(vocab) if vocab else Tokenizer.from_tokens([" "]))
    # only its preprocessing runs: no flow matching or vocoder is needed to cut a text and size its chunks
    streamer = StreamingSynthesizer(Stages(whole.chunked_by(StreamingChunker(streaming)), None, None),
                                    first_chunk_nfe_steps=streaming.first_chunk_nfe_steps)
    totals = [DitWork(), DitWork()]
    for item in items:
        request = validate_request(item.wave, item.reference_text, item.target_text, sample_rate=item.sample_rate,
                                   nfe_steps=nfe_steps, cfg_strength=cfg_strength, seed=0)
        totals[0] += dit_work(whole(request).jobs)
        totals[1] += dit_work(streamer.prepare(request).jobs)
    return totals[0], totals[1]


def format_chunking_table(rows: list[tuple[str, DitWork, DitWork]]) -> str:
    """(set, whole, streamed) rows: chunks, each work term, and whole/streamed of each: the most streamed throughput
    (audio seconds per second) can reach against whole responses' from the chunking alone, audio-normalised (a
    stream's audio differs a little: its chunks' durations are estimated apart)."""
    header = ("set", "requests", "chunks whole/streamed", "tokens×steps whole/streamed",
              "audio s whole/streamed", "bound: linear", "bound: attention", "bound: FLOPs")

    def bound(whole: DitWork, streamed: DitWork, term: str) -> str:
        return f"{getattr(whole, term) / getattr(streamed, term) * streamed.audio_seconds / whole.audio_seconds:.3f}"

    table = [header] + [(name, str(w.requests), f"{w.chunks} / {s.chunks}", f"{w.tokens:.3e} / {s.tokens:.3e}",
                         f"{w.audio_seconds:.1f} / {s.audio_seconds:.1f}", bound(w, s, "tokens"),
                         bound(w, s, "attention"), bound(w, s, "flops")) for name, w, s in rows]
    return _columns(table)


def load_items(path: str | Path) -> list[Item]:
    """A JSONL file ({"ref_audio", "ref_text", "target_text"} per line; paths relative to it) or a folder of
    <name>.wav + <name>.txt (reference transcript) + <name>.target.txt (text to speak)."""
    from f5_triton.audio import read_audio

    path = Path(path)
    items = []
    if path.is_dir():
        for wav in sorted(path.glob("*.wav")):
            wave, rate = read_audio(wav)
            items.append(Item(wave, rate, wav.with_suffix(".txt").read_text().strip(),
                              wav.with_suffix(".target.txt").read_text().strip(), wav.stem))
    else:
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            audio = Path(row["ref_audio"])
            wave, rate = read_audio(audio if audio.is_absolute() else path.parent / audio)
            items.append(Item(wave, rate, row["ref_text"], row["target_text"], row.get("name", f"line-{line_no}")))
    if not items:
        raise ValueError(f"no benchmark items in {path}")
    return items


class StageTimer:
    """Accumulates wall time per stage; synchronizes CUDA so GPU work is counted where it runs."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start

    def _sync(self):
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()


@dataclass
class Result:
    """One run's numbers (a row of the report)."""

    mode: str
    label: str
    requests: int
    batch_size: int | None = None
    concurrency: int | None = None
    wall_seconds: float = 0.0
    audio_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    gpu_peak_mib: float | None = None
    gpu_utilization: dict[str, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def rtf(self) -> float:
        return self.wall_seconds / self.audio_seconds if self.audio_seconds else float("nan")

    @property
    def throughput(self) -> float:
        return self.audio_seconds / self.wall_seconds if self.wall_seconds else float("nan")

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def summary(self) -> dict:
        row = {k: v for k, v in asdict(self).items() if k != "latencies"}
        row.update(rtf=self.rtf, throughput_audio_s_per_s=self.throughput, latency_p50_s=self.percentile(50),
                   latency_p90_s=self.percentile(90), latency_p99_s=self.percentile(99),
                   latency_mean_s=statistics.fmean(self.latencies) if self.latencies else float("nan"))
        return row


def _columns(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells (the first is the header) as aligned text columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(results: list[Result]) -> str:
    header = ("mode", "label", "bs/conc", "reqs", "RTF", "audio s/s", "p50 s", "p90 s", "p99 s", "stages (s)",
              "GPU MiB")
    rows = [header]
    for r in results:
        stages = " ".join(f"{k}={v:.3f}" for k, v in r.stage_seconds.items())
        rows.append((r.mode, r.label, str(r.batch_size or r.concurrency), str(r.requests), f"{r.rtf:.4f}",
                     f"{r.throughput:.1f}", f"{r.percentile(50):.3f}", f"{r.percentile(90):.3f}",
                     f"{r.percentile(99):.3f}", stages or "-", f"{r.gpu_peak_mib:.0f}" if r.gpu_peak_mib else "-"))
    return _columns(rows)


@dataclass(frozen=True)
class StreamTiming:
    """One streamed request, timed by the client: seconds from sending it."""

    first_audio: float  # to the first non-empty piece
    total: float  # to the end
    audio_seconds: float
    stall: float  # playback starting at the first piece would have waited this long for later pieces, in all


def playback_stall(arrivals: list[float], seconds: list[float]) -> float:
    """Seconds a listener would wait in total, after playback started with the first piece, for pieces that came
    after the audio before them had played out (pieces as they arrived: times and audio lengths)."""
    stall, playing_until = 0.0, None
    for arrival, length in zip(arrivals, seconds):
        if playing_until is None:
            playing_until = arrival
        elif arrival > playing_until:
            stall += arrival - playing_until
            playing_until = arrival
        playing_until += length
    return stall


def time_stream(pieces) -> StreamTiming:
    """An iterator of pieces (float arrays, 24 kHz) timed from this call."""
    start = time.perf_counter()
    arrivals, seconds = [], []
    for piece in pieces:
        if len(piece):
            arrivals.append(time.perf_counter() - start)
            seconds.append(len(piece) / SAMPLE_RATE)
    total = time.perf_counter() - start
    return StreamTiming(arrivals[0] if arrivals else total, total, sum(seconds), playback_stall(arrivals, seconds))


def add_stream_timings(result: Result, timings: list[StreamTiming], opening: int = 0) -> None:
    """A streaming run's requests (in request order) into `result`: latencies and audio, and in its `extra` the
    time-to-first-audio percentiles, the playback stalls (p90 of each request's total, and the share of requests
    that stalled at all).

    `opening`: the requests that all started at once (each client's first): their first-audio p50/p90 and the later
    requests' are also given apart. An opening burst is bound by compute (all its first chunks in one batch); a
    request that arrives while others stream, by how soon the scheduler lets it in.
    """
    first_audio = [t.first_audio for t in timings]
    result.latencies += [t.total for t in timings]
    result.audio_seconds += sum(t.audio_seconds for t in timings)

    def percentiles(values, qs, name):
        return {f"first_audio_{name}p{q}_s": float(np.percentile(values, q)) for q in qs}

    result.extra.update(percentiles(first_audio, (50, 90, 99), ""))
    if 0 < opening < len(first_audio):
        result.extra.update(percentiles(first_audio[:opening], (50, 90), "opening_"))
        result.extra.update(percentiles(first_audio[opening:], (50, 90), "later_"))
    stalls = [t.stall for t in timings]
    result.extra.update(stall_p90_s=float(np.percentile(stalls, 90)),
                        stalled_share=sum(stall > 0 for stall in stalls) / len(stalls))


def format_streaming_table(results: list[Result]) -> str:
    """Streaming runs: time to first audio (ms; all requests, the opening burst's and the later ones' p90), playback
    stalls (p90 ms, share of requests), whole request (s), aggregate audio seconds per second."""
    header = ("label", "conc", "reqs", "first audio p50 ms", "p90 ms", "p99 ms", "opening p90", "later p90",
              "stall p90 ms", "stalled", "whole p50 s", "p90 s", "audio s/s")

    def ms(r, key):
        return f"{1000 * r.extra[key]:.0f}" if key in r.extra else "-"

    def share(r):
        return f"{100 * r.extra['stalled_share']:.0f} %" if "stalled_share" in r.extra else "-"

    rows = [header] + [(r.label, str(r.concurrency), str(r.requests), ms(r, "first_audio_p50_s"),
                        ms(r, "first_audio_p90_s"), ms(r, "first_audio_p99_s"), ms(r, "first_audio_opening_p90_s"),
                        ms(r, "first_audio_later_p90_s"), ms(r, "stall_p90_s"), share(r), f"{r.percentile(50):.2f}",
                        f"{r.percentile(90):.2f}", f"{r.throughput:.1f}") for r in results]
    return _columns(rows)


# ---------------------------------------------------------------- open loop: requests at their arrival times

DEFAULT_FIRST_AUDIO_BUDGET_S = 0.35  # goodput's and capacity's budget for the time to first audio
QUEUED_ABOVE_S = 0.01  # a stream counts as queued when it waited above the first histogram bound >= this
# Metric names as f5_triton/serving/metrics.py defines them (that module imports Triton's stub; it cannot be imported
# here) and Triton's own.
QUEUE_SECONDS = "f5_tts_queue_seconds"
REJECTED_REQUESTS = "f5_tts_rejected_requests_total"
REFUSAL_REASONS = ("busy", "queue_timeout")
FLOW_MODEL = "flow_matching"  # the f5_tts step whose Triton queue time is reported


def parse_rates(text: str) -> list[float]:
    """`--request-rate`'s comma list: requests per second, each > 0, or `inf` (every request at once)."""
    rates = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            rate = float(part)
        except ValueError:
            raise ValueError(f"--request-rate: {part!r} is not a number of requests per second (or inf)") from None
        if not rate > 0:
            raise ValueError(f"--request-rate: {part} must be > 0 requests per second (or inf)")
        rates.append(rate)
    if not rates:
        raise ValueError("--request-rate: give at least one rate, e.g. 2,4,8 or inf")
    return rates


def poisson_arrivals(count: int, rate: float, seed: int = 0) -> np.ndarray:
    """Send times in seconds of `count` requests arriving as a Poisson process of `rate` per second (the first at
    0, then exponential gaps of mean 1 / rate, drawn from a generator seeded by `seed`), as vLLM's
    benchmark_serving does; `rate` inf: all at 0."""
    if np.isinf(rate):
        return np.zeros(count)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, max(count - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])[:count]


@dataclass
class Outcome:
    """One open-loop request: when it was sent (seconds from the run's start) and its timing, or why it got none."""

    sent_at: float
    timing: StreamTiming | None = None
    error: BaseException | None = None
    refused: bool = False  # the server turned it away as busy (UNAVAILABLE / 503), a retriable answer


def run_open_loop(send, count: int, arrivals: np.ndarray, max_concurrency: int | None = None,
                  refused=lambda exc: False) -> tuple[list[Outcome], float]:
    """Send request i (`send(i)` -> StreamTiming, in a thread of its own) at `arrivals[i]` seconds from now, whatever
    the earlier ones are doing; `max_concurrency` caps the requests in flight (a request past the cap is sent when
    one ends). An exception is the request's outcome; `refused(exc)` says whether it was a refusal. Returns the
    outcomes in request order and the seconds from the first send to the last answer."""
    outcomes: list[Outcome | None] = [None] * count
    slots = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
    start = time.perf_counter()

    def one(i: int) -> None:
        outcome = Outcome(sent_at=time.perf_counter() - start)
        try:
            outcome.timing = send(i)
        except Exception as exc:  # noqa: BLE001  # every failure is counted and reported, none ends the run
            outcome.error, outcome.refused = exc, refused(exc)
        finally:
            if slots is not None:
                slots.release()
        outcomes[i] = outcome

    threads = []
    for i in range(count):
        delay = arrivals[i] - (time.perf_counter() - start)
        if delay > 0:
            time.sleep(delay)
        if slots is not None:
            slots.acquire()
        threads.append(threading.Thread(target=one, args=(i,), daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join()
    return outcomes, time.perf_counter() - start


def parse_metrics(exposition: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(exposition) for s in family.samples}


def read_metrics(url: str | None) -> dict[tuple[str, tuple], float] | None:
    """`parse_metrics` of a Prometheus endpoint, or None when it cannot be read."""
    import urllib.request

    if not url:
        return None
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return parse_metrics(response.read().decode())
    except (OSError, ValueError):
        return None


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile: the q-quantile of cumulative (upper bound, count) buckets, linear within a
    bucket; the highest finite bound when it falls in the +Inf bucket; None without observations."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if np.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-12)
        lower_bound, lower_count = bound, count
    return lower_bound


def queue_statistics(before: dict | None, after: dict | None, model: str, streaming: bool) -> dict:
    """What the server's metrics say about one run (`read_metrics` before and after it, differenced). Streaming
    (`f5_tts_queue_seconds{model}`, seconds between a stream's arrival and the start of its generation): `queued`,
    the streams that waited above the first bucket bound >= 10 ms, `queue_mean_s` and `queue_p90_s` (from the
    buckets). Whole responses: `queue_mean_s`, the flow-matching model's Triton queue time per request
    (`nv_inference_queue_duration_us` / `nv_inference_request_success`). Both: `server_refused`, the requests
    `f5_tts_rejected_requests_total` counts as busy or past the queue deadline, by reason. A metric the server does
    not have leaves its keys out."""
    if before is None or after is None:
        return {}
    delta = {key: value - before.get(key, 0.0) for key, value in after.items()}

    def samples(name, **labels):  # the parser names a counter's samples <name>_total, Triton's counters too
        return [(dict(key), value) for (sample, key), value in delta.items()
                if sample in (name, f"{name}_total") and all(dict(key).get(k) == v for k, v in labels.items())]

    def total(name, **labels):
        found = samples(name, **labels)
        return sum(value for _, value in found) if found else None

    stats: dict = {}
    if streaming:
        count = total(f"{QUEUE_SECONDS}_count", model=model)
        buckets = [(float(labels["le"]), value) for labels, value in samples(f"{QUEUE_SECONDS}_bucket", model=model)]
        if count is not None and buckets:
            bound = min((le for le, _ in buckets if le >= QUEUED_ABOVE_S), default=float("inf"))
            within = sum(value for le, value in buckets if le == bound)
            stats.update(queued=int(round(count - within)),
                         queue_mean_s=total(f"{QUEUE_SECONDS}_sum", model=model) / count if count else 0.0,
                         queue_p90_s=histogram_quantile(0.9, buckets))
    else:
        queue_us = total("nv_inference_queue_duration_us", model=FLOW_MODEL)
        requests = total("nv_inference_request_success", model=FLOW_MODEL)
        if queue_us is not None and requests:
            stats["queue_mean_s"] = queue_us / requests / 1e6
    refused = {reason: total(REJECTED_REQUESTS, reason=reason) for reason in REFUSAL_REASONS}
    if any(value is not None for value in refused.values()):
        stats["server_refused"] = {reason: int(value or 0) for reason, value in refused.items()}
    return stats


def add_open_loop_outcomes(result: Result, outcomes: list[Outcome], rate: float, wall_seconds: float,
                           budget: float) -> None:
    """An open-loop run's outcomes into `result`: the answered requests' timings as `add_stream_timings` reads
    them, and in its `extra` the counts (sent = completed + refused + failed), the offered, sent and achieved
    rates, and the goodput: the share of the requests sent whose first audio came within `budget` seconds and that
    never stalled (refused and failed requests count against it)."""
    done = [o.timing for o in outcomes if o.timing is not None]
    refused = sum(o.refused for o in outcomes)
    sends = sorted(o.sent_at for o in outcomes)
    result.wall_seconds = wall_seconds
    result.requests = len(outcomes)
    if done:
        add_stream_timings(result, done)
    good = sum(t.first_audio <= budget and t.stall == 0 for t in done)
    result.extra.update(
        request_rate=rate if np.isfinite(rate) else "inf", sent=len(outcomes), completed=len(done), refused=refused,
        failed=len(outcomes) - len(done) - refused, first_audio_budget_s=budget,
        goodput=good / len(outcomes) if outcomes else float("nan"),
        sent_rate=(len(sends) - 1) / (sends[-1] - sends[0]) if len(sends) > 1 and sends[-1] > sends[0] else "inf",
        achieved_rate=len(done) / wall_seconds if wall_seconds else float("nan"))
    errors = [o.error for o in outcomes if o.error is not None and not o.refused]
    if errors:
        result.extra["failures"] = sorted({f"{type(e).__name__}: {e}"[:300] for e in errors})


def holds(row: dict, budget: float | None = None) -> bool:
    """Whether an open-loop row (`Result.summary()`) held its load: every request was answered (none refused or
    failed), none stalled, and the first-audio p90 is within the budget."""
    extra = row["extra"]
    budget = extra["first_audio_budget_s"] if budget is None else budget
    return (extra["refused"] == 0 and extra["failed"] == 0 and extra.get("stalled_share", 0.0) == 0
            and extra.get("first_audio_p90_s", float("inf")) <= budget)


def capacity(rows: list[dict]) -> dict[str, float | None]:
    """Per label, the highest finite offered rate up to which every swept rate `holds` (None: not even the lowest)."""
    found: dict[str, float | None] = {}
    for label in dict.fromkeys(r["label"] for r in rows):
        swept = sorted((float(r["extra"]["request_rate"]), holds(r)) for r in rows if r["label"] == label)
        found[label] = None
        for rate, ok in swept:
            if not ok or np.isinf(rate):
                break
            found[label] = rate
    return found


def format_open_loop_table(results: list[Result]) -> str:
    """Open-loop runs: offered, achieved rate (req/s); requests sent, refused, failed; first audio and whole request;
    playback stalls; the server's queue; goodput; audio s/s."""
    header = ("label", "rate", "achieved", "sent", "refused", "failed", "first audio p50 ms", "p90 ms", "p99 ms",
              "whole p50 s", "p90 s", "p99 s", "stalled", "stall p90 ms", "queued", "queue mean ms", "goodput",
              "audio s/s")

    def ms(r, key):
        value = r.extra.get(key)
        return f"{1000 * value:.0f}" if value is not None else "-"

    def share(r, key):
        return f"{100 * r.extra[key]:.0f} %" if key in r.extra else "-"

    rows = [header]
    for r in results:
        e = r.extra
        rate = e["request_rate"]
        rows.append((r.label, str(rate) if isinstance(rate, str) else f"{rate:g}", f"{e['achieved_rate']:.2f}",
                     str(e["sent"]), str(e["refused"]), str(e["failed"]), ms(r, "first_audio_p50_s"),
                     ms(r, "first_audio_p90_s"), ms(r, "first_audio_p99_s"), f"{r.percentile(50):.2f}",
                     f"{r.percentile(90):.2f}", f"{r.percentile(99):.2f}", share(r, "stalled_share"),
                     ms(r, "stall_p90_s"), str(e.get("queued", "-")), ms(r, "queue_mean_s"), share(r, "goodput"),
                     f"{r.throughput:.1f}"))
    return _columns(rows)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(results: list[Result], path: str | Path, title: str = "f5-triton") -> Path:
    """Throughput and p50/p90 latency against concurrency (or batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r.concurrency or r.batch_size for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(xs, [r.throughput for r in results], "o-")
    left.set_xlabel("concurrency" if results and results[0].concurrency else "batch size")
    left.set_ylabel("audio seconds per second")
    left.set_title("throughput")
    right.plot(xs, [r.percentile(50) for r in results], "o-", label="p50")
    right.plot(xs, [r.percentile(90) for r in results], "s--", label="p90")
    right.set_xlabel(left.get_xlabel())
    right.set_ylabel("latency (s)")
    right.set_title("latency")
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.set_xticks(xs)
    fig.suptitle(title)
    return _save(fig, path)


def plot_runs(rows: list[dict], path: str | Path, title: str = "f5-triton") -> Path:
    """Bars of throughput per run (benchmark.py JSON rows: label, concurrency or batch size), each annotated
    with its p50 latency and mean GPU utilisation: for runs that differ in setup rather than in load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['label']}\n{'c' if r.get('concurrency') else 'bs'}{r.get('concurrency') or r.get('batch_size')}"
             for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.9 * len(rows)), 4))
    bars = ax.bar(range(len(rows)), [r["throughput_audio_s_per_s"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        util = r.get("gpu_utilization") or {}
        busy = [v for v in util.values() if v > 1.0]  # GPUs the run did not use read 0
        note = f"p50 {r['latency_p50_s']:.2f} s" + (f"\nGPU {np.mean(busy):.0f} %" if busy else "")
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylabel("audio seconds per second")
    ax.set_ylim(0, 1.2 * max(r["throughput_audio_s_per_s"] for r in rows))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    return _save(fig, path)


def plot_streaming(rows: list[dict], path: str | Path, title: str = "f5_tts_streaming") -> Path:
    """Streaming sweeps (benchmark.py --streaming JSON rows), one line per label: time to first audio p90 and
    streamed audio seconds per second against the number of concurrent streams."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (first, rate) = plt.subplots(1, 2, figsize=(11, 4))
    for label in sorted({r["label"] for r in rows}):
        sweep = sorted((r for r in rows if r["label"] == label), key=lambda r: r["concurrency"])
        streams = [r["concurrency"] for r in sweep]
        first.plot(streams, [1000 * r["extra"]["first_audio_p90_s"] for r in sweep], marker="o", label=label)
        rate.plot(streams, [r["throughput_audio_s_per_s"] for r in sweep], marker="o", label=label)
    first.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="time to first audio, p90 (ms)")
    rate.set(xscale="log", xlabel="concurrent streams", ylabel="streamed audio seconds per second")
    for ax in (first, rate):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_open_loop(rows: list[dict], path: str | Path, title: str = "open loop") -> Path:
    """Open-loop sweeps (benchmark.py --request-rate JSON rows), one line per label against the offered rate: time to
    first audio p50 and p90 with the budget (left), the shares of requests that stalled and that were refused
    (right). An `inf` rate (every request at once) is drawn right of the highest finite rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [float(r["extra"]["request_rate"]) for r in rows if r["extra"]["request_rate"] != "inf"]
    burst_x = 1.5 * max(finite, default=1.0)

    def x(row):
        rate = row["extra"]["request_rate"]
        return burst_x if rate == "inf" else float(rate)

    fig, (first, shares) = plt.subplots(1, 2, figsize=(11, 4))
    for i, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
        sweep = sorted((r for r in rows if r["label"] == label), key=x)
        xs, color = [x(r) for r in sweep], f"C{i % 10}"

        def ms(key):
            return [1000 * r["extra"][key] if key in r["extra"] else np.nan for r in sweep]

        first.plot(xs, ms("first_audio_p50_s"), "o-", color=color, label=f"{label} p50")
        first.plot(xs, ms("first_audio_p90_s"), "s--", color=color, label=f"{label} p90")
        shares.plot(xs, [100 * r["extra"].get("stalled_share", 0.0) for r in sweep], "o-", color=color,
                    label=f"{label} stalled")
        shares.plot(xs, [100 * r["extra"]["refused"] / max(r["extra"]["sent"], 1) for r in sweep], "x:",
                    color=color, label=f"{label} refused")
    budgets = {r["extra"]["first_audio_budget_s"] for r in rows}
    for budget in budgets:
        first.axhline(1000 * budget, color="gray", lw=0.8, ls="-.", label=f"budget {1000 * budget:.0f} ms")
    first.set(yscale="log", xlabel="offered rate (requests/s)", ylabel="time to first audio (ms)")
    shares.set(xlabel="offered rate (requests/s)", ylabel="share of requests (%)", ylim=(-2, 102))
    ticks = {rate: f"{rate:g}" for rate in sorted(set(finite))}
    if len(finite) < len(rows):
        ticks[burst_x] = "inf"
    for ax in (first, shares):
        ax.set_xticks(list(ticks), list(ticks.values()))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def gpu_time_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds of `fn()` on the current CUDA stream, timed with CUDA events after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def matmul_peak_tflops(size: int = 8192, dtype: str = "bfloat16") -> float:
    """The GPU's measured matmul throughput in `dtype` (size^3 GEMMs), the denominator of MFU."""
    import torch

    a, b = (torch.randn(size, size, device="cuda", dtype=getattr(torch, dtype)) for _ in range(2))
    return 2 * size**3 / (gpu_time_ms(lambda: a @ b) / 1e3) / 1e12


def memory_bandwidth_gbps(megabytes: int = 2048) -> float:
    """The GPU's measured memory bandwidth: a device-to-device copy of `megabytes`, bytes read + written per second
    (GB/s), the memory ceiling of a roofline."""
    import torch

    src = torch.empty(megabytes << 20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / (gpu_time_ms(lambda: dst.copy_(src)) / 1e3) / 1e9


# The packed DiT step's cost model, per kind of kernel (issue 33). FLOPs are matrix FLOPs (GEMMs, convolutions,
# attention: what torch.utils.flop_counter counts); elementwise arithmetic is not counted, those kinds are bound by
# their bytes. Bytes are what each kernel reads and writes once, in fp16, assuming the fusion of the compiled step
# (inductor, as profiled in docs/results/h200-packed-burst-s12-nhwc.json):
# - each LayerNorm is one kernel with the residual add and gate of the sublayer before it and the modulation after
#   it: it reads the residual stream and the sublayer's output, writes the new residual stream and the normed input
#   (the first norm's sublayer is the position convolution, whose last Mish it applies; the output norm writes no
#   residual), plus each token's sequence index and the per-sequence shift/scale/gate rows;
# - the GELU is in the first feed-forward GEMM's epilogue (`Kernels.gelu_epilogue`), biases in every GEMM's;
# - rotary: one kernel reads q and k (from the q/k/v GEMM's output), each token's position and its fp32 cos/sin
#   rows, and writes q and k; v goes to the attention as the GEMM wrote it;
# - attention reads q, k, v once and writes its output (the flash kernels' ideal);
# - the position convolution: the gapped layout (read the tokens, write them with the gaps), two grouped
#   convolutions, the first Mish (the second is in the first norm kernel); the inputs' concatenation is counted with
#   the input projection; the time embedding's sinusoid and SiLU with its GEMMs, all on [sequences, ...] rows.
# The text embedding runs once per request, not in the step. "other" (memsets, copies, unrecognised kernels) is
# measured only.
STEP_KINDS = ("GEMM q/k/v + out", "GEMM feed-forward", "GEMM input projection", "GEMM output projection", "attention",
              "norms + modulation + residual", "rotary q/k", "time embedding + modulation", "position convolution",
              "other")


@dataclass(frozen=True)
class Cost:
    """Matrix FLOPs and bytes moved of some kernels."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __mul__(self, times: float) -> "Cost":
        return Cost(self.flops * times, self.bytes * times)

    __rmul__ = __mul__


def step_costs(config, lengths, value_bytes: int = 2) -> dict[str, Cost]:
    """The cost of one packed DiT step over sequences of `lengths` tokens, per kind (`STEP_KINDS`)."""
    from f5_triton.model.dit import POSITION_CONV_GROUPS, POSITION_CONV_KERNEL, TIME_FREQ_DIM
    from f5_triton.model.packing import CONV_GAP

    tokens, sequences, v = sum(lengths), len(lengths), value_bytes
    d, inner, ff = config.dim, config.heads * config.dim_head, int(config.dim * config.ff_mult)
    inputs, gapped = 2 * config.mel_dim + config.text_dim, tokens + CONV_GAP * (len(lengths) + 1)

    def gemm(rows, k, n):  # [rows, k] @ [k, n] + bias, each operand read once, the result written once
        return Cost(2 * rows * k * n, v * (rows * k + k * n + n + rows * n))

    def norm(writes=2):  # reads the residual stream and the sublayer output, writes `writes` [tokens, d] arrays
        return Cost(0, v * (2 + writes) * tokens * d + 8 * tokens + v * 3 * sequences * d)

    conv_weight = d * (d // POSITION_CONV_GROUPS) * POSITION_CONV_KERNEL
    conv = Cost(2 * gapped * conv_weight, v * (2 * gapped * d + conv_weight + d))
    return {  # in STEP_KINDS' order
        "GEMM q/k/v + out": config.depth * (gemm(tokens, d, 3 * inner) + gemm(tokens, inner, d)),
        "GEMM feed-forward": config.depth * (gemm(tokens, d, ff) + gemm(tokens, ff, d)),
        "GEMM input projection": gemm(tokens, inputs, d) + Cost(0, v * 2 * tokens * inputs),
        "GEMM output projection": gemm(tokens, d, config.mel_dim),
        "attention": config.depth * Cost(4 * inner * sum(n * n for n in lengths), v * 4 * tokens * inner),
        "norms + modulation + residual": 2 * config.depth * norm() + norm(writes=1),
        "rotary q/k": config.depth * Cost(0, v * 4 * tokens * inner + tokens * (8 + 2 * 4 * config.dim_head)),
        "time embedding + modulation": (gemm(sequences, TIME_FREQ_DIM, d) + gemm(sequences, d, d)
                                        + config.depth * gemm(sequences, d, 6 * d) + gemm(sequences, d, 2 * d)),
        "position convolution": 2 * conv + Cost(0, v * ((tokens + gapped) * d + 2 * gapped * d)),
        "other": Cost(),
    }


def dit_step_flops(config, tokens: int, frames: int) -> float:
    """Forward matrix FLOPs of one DiT step over `tokens` = batch x frames rows: `step_costs` of batch sequences of
    `frames` (a padded step's convolution has no gaps between rows: a difference below 0.1 %)."""
    return sum(cost.flops for cost in step_costs(config, [frames] * (tokens // frames)).values())


GEMM_OPS = {"aten::addmm": 1, "aten::_addmm_activation": 1, "aten::mm": 0}  # op: where its two matrices begin
_TRITON_NAME_KINDS = (  # inductor names its kernels after the ops they fuse; first match wins
    ("norms + modulation + residual", ("layer_norm",)),
    ("position convolution", ("convolution", "mish", "index_copy", "new_zeros")),
    ("rotary q/k", ("neg", "stack")),  # rotate_half
    ("time embedding + modulation", ("sin", "cos", "exp", "silu")),
    ("GEMM input projection", ("cat",)),  # the concatenation of x, cond and the text embedding
)
_LIBRARY_NAME_KINDS = (("attention", ("flash", "fmha", "attention")),
                       ("position convolution", ("conv", "fprop", "implicit_gemm")))


def _names(text: str, words) -> bool:
    """Whether `text` holds one of `words` between non-letters (`cos` in `_cos_`, not in `cosine`)."""
    return any(re.search(rf"(?<![a-z]){re.escape(w)}(?![a-z])", text) for w in words)


def step_kind(config, tokens: int, sequences: int, kernel: str, op: str = "", shapes=()) -> str:
    """The `STEP_KINDS` entry of a kernel of a packed step over `tokens` tokens in `sequences` sequences: a GEMM by
    the shapes of the op that launched it (`op`, its input `shapes` as torch.profiler records them), a convolution's by
    its op, other kernels by their name (inductor's `triton_*` kernels name the ops they fuse, and so does the
    profiler range inductor launches each in; library kernels name their algorithm)."""
    if op in GEMM_OPS and len(shapes) >= GEMM_OPS[op] + 2:
        (rows, k), (_, n) = shapes[GEMM_OPS[op]:GEMM_OPS[op] + 2]
        d, inner, ff = config.dim, config.heads * config.dim_head, int(config.dim * config.ff_mult)
        if rows == sequences:
            return "time embedding + modulation"
        if rows == tokens:
            for kind, pairs in (("GEMM q/k/v + out", ((d, 3 * inner), (inner, d))),
                                ("GEMM feed-forward", ((d, ff), (ff, d))),
                                ("GEMM input projection", ((2 * config.mel_dim + config.text_dim, d),)),
                                ("GEMM output projection", ((d, config.mel_dim),))):
                if (k, n) in pairs:
                    return kind
        return "other"
    if op.startswith("aten::") and "conv" in op:  # cuDNN's kernels and layout transposes
        return "position convolution"
    name = kernel.lower()
    table = _TRITON_NAME_KINDS if name.startswith("triton_") else _LIBRARY_NAME_KINDS
    return next((kind for kind, words in table if _names(name, words)), "other")


def roofline(costs: dict[str, Cost], ms_by_kind: dict[str, float] | None = None, peak_tflops: float | None = None,
             bandwidth_gbps: float | None = None) -> list[dict]:
    """One row per kind: measured ms (where given), FLOPs, bytes, arithmetic intensity and, given the ceilings, the
    roofline's bound max(FLOPs / peak, bytes / bandwidth) in ms and the share of it attained (bound / measured)."""
    rows = []
    for kind, cost in costs.items():
        row = dict(step_kind=kind, ms=None if ms_by_kind is None else ms_by_kind.get(kind, 0.0),
                   gflop=cost.flops / 1e9, mbytes=cost.bytes / 1e6,
                   flop_per_byte=cost.flops / cost.bytes if cost.bytes else None)
        if peak_tflops and bandwidth_gbps:
            compute, memory = cost.flops / (peak_tflops * 1e9), cost.bytes / (bandwidth_gbps * 1e6)
            row.update(bound="compute" if compute > memory else "memory" if cost.bytes else "-",
                       bound_ms=max(compute, memory))
            row["roofline_share"] = row["bound_ms"] / row["ms"] if row["ms"] and row["bound_ms"] else None
        rows.append(row)
    return rows


def roofline_summary(costs: dict[str, Cost], ms_by_kind: dict[str, float], step_ms: float, ceilings: dict) -> dict:
    """A profiled step as a whole: its ms (timed with CUDA events) and its kernels' ms (the profile's sum), its FLOPs,
    MFU against the matmul peak of the model's dtype (`matmul_tflops`), the roofline's bound and the share of it
    attained, and the attention's TFLOP/s against that peak and against the attention kernel's best case
    (`attention_tflops`). ceilings: also `bandwidth_gbps`."""
    flops = sum(cost.flops for cost in costs.values())
    bound_ms = sum(row["bound_ms"] for row in roofline(costs, None, ceilings["matmul_tflops"],
                                                       ceilings["bandwidth_gbps"]))
    attention_ms = ms_by_kind.get("attention", 0.0)
    attention_tflops = costs["attention"].flops / attention_ms / 1e9 if attention_ms else float("nan")
    return dict(step_ms=step_ms, kernel_ms=sum(ms_by_kind.values()), tflop=flops / 1e12,
                mfu=flops / (step_ms * 1e9) / ceilings["matmul_tflops"], bound_ms=bound_ms,
                roofline_share=bound_ms / step_ms, attention_tflops=attention_tflops,
                attention_share_of_peak=attention_tflops / ceilings["matmul_tflops"],
                attention_share_of_best=attention_tflops / ceilings["attention_tflops"])


def format_roofline(rows: list[dict]) -> str:
    """`roofline` rows as a text table with a total line; the counts alone where nothing was measured."""
    def num(value, spec):
        return "-" if value is None else format(value, spec)

    def total(key):
        return sum(r[key] for r in rows) if all(r.get(key) is not None for r in rows) else None

    ms, gflop, mbytes, bound_ms = (total(key) for key in ("ms", "gflop", "mbytes", "bound_ms"))
    rows = rows + [dict(step_kind="total", ms=ms, gflop=gflop, mbytes=mbytes, flop_per_byte=1e3 * gflop / mbytes,
                        bound_ms=bound_ms, roofline_share=bound_ms / ms if ms and bound_ms else None)]
    lines = [("kind", "GFLOP", "MB", "FLOP/B")]
    lines += [(r["step_kind"], num(r["gflop"], ".1f"), num(r["mbytes"], ".1f"), num(r["flop_per_byte"], ".0f"))
              for r in rows]
    if ms is not None:
        lines = [line + extra for line, extra in zip(lines, [("ms", "bound", "roofline ms", "% of roofline")] + [
            (num(r["ms"], ".3f"), r.get("bound", ""), num(r.get("bound_ms"), ".3f"),
             num(None if r.get("roofline_share") is None else 100 * r["roofline_share"], ".0f")) for r in rows])]
    return _columns(lines)


def plot_roofline(rows: list[dict], path: str | Path, title: str = "packed DiT step against its roofline") -> Path:
    """Per request count (rows of `roofline` with `requests`), one panel: the step's measured ms stacked by kind
    beside its roofline bound stacked the same way."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    requests = sorted({r["requests"] for r in rows})
    fig, axes = plt.subplots(1, len(requests), figsize=(3.0 + 2.4 * len(requests), 4.2), squeeze=False)
    for ax, count in zip(axes[0], requests):
        by_kind = {r["step_kind"]: r for r in rows if r["requests"] == count}
        for x, key in ((0, "ms"), (1, "bound_ms")):
            bottom = 0.0
            for j, kind in enumerate(STEP_KINDS):
                value = by_kind.get(kind, {}).get(key) or 0.0
                ax.bar(x, value, 0.7, bottom=bottom, color=f"C{j}", hatch="//" if x else None, edgecolor="white",
                       label=kind if x == 0 else None)
                bottom += value
            ax.annotate(f"{bottom:.2f} ms", (x, bottom), ha="center", va="bottom", fontsize=8)
        ax.set_xticks([0, 1], ["measured", "roofline"])
        ax.set_title(f"{count} requests", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("ms per step")
    axes[0][-1].legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="center left",
                       bbox_to_anchor=(1.02, 0.5))
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


class GpuSampler:
    """Samples per-GPU utilisation with NVML in a thread while a run is in progress (no-op without NVML)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.samples: dict[int, list[float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # no NVML (CPU machine, missing package): nothing to sample
            return self

        def run():
            while not self._stop.wait(self.interval):
                for i, h in enumerate(handles):
                    self.samples.setdefault(i, []).append(float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def mean_utilization(self) -> dict[str, float]:
        return {f"gpu{i}": float(np.mean(v)) for i, v in self.samples.items() if v}


def plot_side_by_side(results: dict, path: str | Path) -> Path:
    """Bar chart of scripts/bench_vs_upstream.py's JSON: seconds per request, upstream vs ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("upstream\nCFM.sample + Vocos", results["upstream_seconds"])] if "upstream_seconds" in results else []
    bars += [(f"f5-triton\n{key[len('ours_'):-len('_seconds')]}", value) for key, value in results.items()
             if key.startswith("ours_") and key.endswith("_seconds")]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    names, seconds = zip(*bars)
    rects = ax.bar(names, [s * 1000 for s in seconds], color=["#999999"] + ["#2a7ab9"] * (len(bars) - 1))
    for rect, s in zip(rects, seconds):
        ax.annotate(f"{s * 1000:.0f} ms\nRTF {s / results['audio_seconds']:.4f}", (rect.get_x() + rect.get_width() / 2,
                    rect.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per request")
    ax.set_ylim(0, max(seconds) * 1300)
    ax.set_title(f"{results['gpu']}, {results['arch']}, NFE {results['nfe']}, {results['dtype']}, batch 1\n"
                 f"{results['audio_seconds']:.1f} s generated", fontsize=9)
    return _save(fig, path)


def profiler_spans(prof) -> list[tuple[str, str, float, float]]:
    """A finished torch.profiler run's events as `gpu_idle_summary`'s spans (no trace file: a busy GPU's trace of a
    few seconds holds millions of events, slow to write and to read back)."""
    from torch.autograd import DeviceType

    spans = []
    for e in prof.profiler.kineto_results.events():
        on_gpu = e.device_type() == DeviceType.CUDA
        if on_gpu and e.is_user_annotation():  # a record_function range as seen on the GPU's timeline: not work
            continue
        kind = "gpu" if on_gpu else "label" if e.is_user_annotation() else "op"
        spans.append((kind, e.name(), e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3))
    return spans


def _innermost_at(spans: list[tuple[str, float, float]], points: list[float]) -> list[str]:
    """For each point (ascending), the name of the shortest span (name, start, end) containing it, or "(none)"."""
    import heapq

    spans = sorted(spans, key=lambda s: s[1])
    heap: list[tuple[float, float, str]] = []  # (duration, end, name); expired entries leave when they surface
    names, i = [], 0
    for point in points:
        while i < len(spans) and spans[i][1] <= point:
            name, start, end = spans[i]
            heapq.heappush(heap, (end - start, end, name))
            i += 1
        while heap and heap[0][1] < point:
            heapq.heappop(heap)
        names.append(heap[0][2] if heap else "(none)")
    return names


def gpu_idle_summary(spans: list[tuple[str, str, float, float]], min_gap_ms: float = 0.05, top: int = 8) -> dict:
    """Where the GPU waited. spans: (kind, name, start_us, end_us), kind "gpu" (a kernel or copy), "label" (a
    `record_function` range on the host) or "op" (a host op: aten, CUDA runtime calls).

    busy: the union of the GPU's spans over the time from its first to its last; each idle gap longer than
    `min_gap_ms` is charged to what the host was doing at its middle: the innermost label there (any thread), and the
    innermost host op there."""
    device = sorted((start, end) for kind, _, start, end in spans if kind == "gpu")
    summary = {"span_ms": 0.0, "busy_ms": 0.0, "busy_share": None, "gaps": 0, "idle_by_label": {}, "idle_by_op": {}}
    if not device:
        return summary
    busy, gaps, (start, end) = 0.0, [], device[0]
    for s, e in device[1:]:
        if s > end:
            busy += end - start
            if (s - end) / 1e3 >= min_gap_ms:
                gaps.append((end, s))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    span = end - device[0][0]
    middles = [(s + e) / 2 for s, e in gaps]

    def charged(kind):
        table: dict[str, float] = {}
        names = _innermost_at([(n, s, e) for k, n, s, e in spans if k == kind], middles)
        for name, (s, e) in zip(names, gaps):
            table[name] = table.get(name, 0.0) + (e - s) / 1e3
        return {k: round(v, 2) for k, v in sorted(table.items(), key=lambda kv: -kv[1])[:top]}

    summary.update(span_ms=round(span / 1e3, 2), busy_ms=round(busy / 1e3, 2), busy_share=round(busy / span, 4),
                   gaps=len(gaps), idle_by_label=charged("label"), idle_by_op=charged("op"))
    return summary


def all_threads_profile():
    """A torch.profiler context over every thread's host ops (the stream scheduler runs in its own thread) and, where
    there is a GPU, its kernels and copies."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    return profile(activities=activities,
                   experimental_config=torch._C._profiler._ExperimentalConfig(profile_all_threads=True))


@contextmanager
def gpu_idle_profile(enabled: bool, trace_path: str | Path | None = None):
    """torch.profiler around the block (host ops and GPU kernels, every thread); on exit the yielded dict is filled
    with `gpu_idle_summary`, and the Chrome trace is written to `trace_path` if given. A no-op yielding {} when not
    `enabled`."""
    report: dict = {}
    if not enabled:
        yield report
        return
    with all_threads_profile() as prof:
        yield report
    report.update(gpu_idle_summary(profiler_spans(prof)))
    if trace_path is not None:
        Path(trace_path).parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(trace_path))


def format_idle_summary(summary: dict) -> str:
    if summary.get("busy_share") is None:
        return "GPU idle profile: no GPU activity recorded"
    lines = [f"GPU busy {100 * summary['busy_share']:.1f} % of {summary['span_ms']:.0f} ms "
             f"({summary['gaps']} idle gaps); idle ms by the host's record_function label:"]
    lines += [f"  {ms:9.2f}  {name}" for name, ms in summary["idle_by_label"].items()]
    lines.append("idle ms by the host op in progress:")
    lines += [f"  {ms:9.2f}  {name}" for name, ms in summary["idle_by_op"].items()]
    return "\n".join(lines)
