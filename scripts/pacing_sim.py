#!/usr/bin/env python3
"""The stream scheduler under load on the CPU, its GPU work replaced by sleeps of a linear cost model.

A CPU simulation, never a GPU result: `StreamScheduler` (its rounds, cohorts, pacing and admission, unchanged) runs
real streams of a built-in set, preprocessed by the package (the streaming chunker, the duration rule); only the
flow-matching segments and the vocoder calls sleep instead of computing, for as long as the model below says:

    one ODE step of a cohort: step_base + step_per_token x tokens (tokens: both guidance rows of every chunk)
    one vocoder call:         vocoder_base + vocoder_per_frame x frames
    a segment (the steps a round advances): 8 steps up to --segment-tokens tokens, halved each time the cohort's
    tokens double past that, at least 1 (CUDA graphs of packed batches: about one request's graph of work a round)

The defaults are H100-like for random F5TTS_v1_Base at fp16. Closed loop at each --concurrency, as
`benchmark.py --streaming` (each client sends its next request when its last one ends), with the benchmark's own
timing: first audio, playback stalls, aggregate audio s/s; and how long streams waited for admission and the pieces
the scheduler itself handed out late. `--unsplit-at-load` runs each row at each value of the opt-in load-aware first
chunk (`StreamingConfig.unsplit_at_load`; 0: off, the default), and counts the streams it cut whole.

    python scripts/pacing_sim.py --set mixed --concurrency 8,16 --num-requests 64
    python scripts/pacing_sim.py --set mixed --concurrency 8,16,32 --max-streams 32 --unsplit-at-load 0,8
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

import _checkout  # noqa: F401  (benchmarks/ beside the package)
from benchmarks import bench
from f5_triton.config import DEFAULT_SCHEDULER, DEFAULT_STREAMING, HOP_LENGTH, SamplingConfig
from f5_triton.pipeline import Preprocessor, Stages
from f5_triton.request import validate_request
from f5_triton.stream_scheduler import QueueSink, StreamScheduler, chunk_of
from f5_triton.streaming import StreamingSynthesizer
from f5_triton.text import StreamingChunker, Tokenizer


class SleepingSolving:
    """`sampler.Solving`'s interface for one cohort: each `advance` sleeps its steps' time."""

    def __init__(self, jobs, model):
        self.jobs, self.model = jobs, model
        self.tokens = sum(chunk_of(job).tokens for job in jobs)
        self.steps = max(job.nfe_steps for job in jobs)
        self.index = 0

    @property
    def done(self) -> bool:
        return self.index >= self.steps

    @property
    def segment(self) -> int:
        doublings = max(0, math.ceil(math.log2(self.tokens / self.model.segment_tokens))) if self.tokens else 0
        return max(1, 8 >> doublings)

    def advance(self, steps=None, on_step=None) -> None:
        end = self.steps if steps is None else min(self.steps, self.index + steps)
        time.sleep((end - self.index) * (self.model.step_base + self.model.step_per_token * self.tokens))
        self.index = end

    def result(self):
        return [torch.zeros(job.total_frames, 1) for job in self.jobs]


class SleepingFlowMatcher:
    """`pipeline.FlowMatcher`'s interface (what the scheduler calls), sleeping."""

    def __init__(self, model):
        self.model = model

    def begin(self, jobs):
        return [(list(range(len(jobs))), SleepingSolving(jobs, self.model))]

    def __call__(self, jobs, on_step=None, keep=None):
        solving = SleepingSolving(jobs, self.model)
        solving.advance()
        return solving.result()

    def synchronize(self) -> None:
        pass


class CountingSynthesizer(StreamingSynthesizer):
    """The synthesizer, counting the streams it cuts whole (`unsplit_at_load`)."""

    unsplit = 0

    def prepare(self, request, held: int = 0):
        self.unsplit += self.cuts_whole(held)
        return super().prepare(request, held)


class SleepingVocoder:
    def __init__(self, model):
        self.model = model

    def __call__(self, mels):
        frames = sum(mel.shape[0] for mel in mels)
        time.sleep(self.model.vocoder_base + self.model.vocoder_per_frame * frames)
        return [np.zeros(mel.shape[0] * HOP_LENGTH, dtype=np.float32) for mel in mels]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="mixed", choices=bench.BUILTIN_SETS)
    p.add_argument("--concurrency", default="8,16", help="closed-loop clients, a comma list")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--nfe", type=int, default=16)
    p.add_argument("--max-streams", type=int, default=DEFAULT_SCHEDULER.max_streams)
    p.add_argument("--step-base", type=float, default=1.0e-3, help="seconds of one ODE step of a cohort, fixed part")
    p.add_argument("--step-per-token", type=float, default=1.05e-6, help="... and per token (both guidance rows)")
    p.add_argument("--vocoder-base", type=float, default=2e-3)
    p.add_argument("--vocoder-per-frame", type=float, default=2e-7)
    p.add_argument("--segment-tokens", type=int, default=4096)
    p.add_argument("--unsplit-at-load", default=str(DEFAULT_STREAMING.unsplit_at_load),
                   help="the load-aware first chunk's setting, a comma list (0: off): each row at each")
    p.add_argument("--label", default="sim")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = SimpleNamespace(**{k: getattr(args, k) for k in ("step_base", "step_per_token", "vocoder_base",
                                                             "vocoder_per_frame", "segment_tokens")})
    from f5_triton.cache import LRUCache

    preprocess = Preprocessor(Tokenizer.from_tokens([" "]), cache=LRUCache("references", 1024, 2**30), chunker=StreamingChunker())
    stages = Stages(preprocess, SleepingFlowMatcher(model), SleepingVocoder(model))
    items = bench.builtin_set(args.set, args.num_requests)
    requests = [validate_request(it.wave, it.reference_text, it.target_text, sample_rate=it.sample_rate,
                                 nfe_steps=args.nfe, seed=i) for i, it in enumerate(items)]
    for request in requests:  # the references' mels into the cache: the timed requests preprocess as a warm server
        preprocess(request)
    results = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        for unsplit_at_load in [int(n) for n in args.unsplit_at_load.split(",")]:
            # a scheduler per row: its cost model learns from the warm-up stream, as a server's at load
            synthesizer = CountingSynthesizer(stages, unsplit_at_load=unsplit_at_load)
            label = f"{args.label} {args.set}" + (f" unsplit@{unsplit_at_load}" if unsplit_at_load else "")
            with StreamScheduler(synthesizer, max_streams=args.max_streams) as scheduler:
                scheduler.warm_up(SamplingConfig(nfe_steps=args.nfe))
                result = run_closed_loop(scheduler, requests, concurrency, label)
                result.extra.update(late_pieces=scheduler.late_pieces, unsplit=synthesizer.unsplit)
            results.append(result)
            print(bench.format_streaming_table([result]).splitlines()[-1], flush=True)
    print("CPU simulation (sleeps of a linear cost model, not a GPU):")
    print(bench.format_streaming_table(results))
    print("admission wait p50 / p90 ms, pieces the scheduler handed out late, streams cut whole: " + "; ".join(
        f"{r.label} c{r.concurrency} {1000 * r.extra['queued_p50_s']:.0f} / {1000 * r.extra['queued_p90_s']:.0f}, "
        f"{r.extra['late_pieces']}, {r.extra['unsplit']}/{r.requests}" for r in results))
    return 0


def run_closed_loop(scheduler, requests, concurrency: int, label: str) -> bench.Result:
    import concurrent.futures

    queued = []

    class Sink(QueueSink):
        def started(self, queued_seconds: float) -> None:
            queued.append(queued_seconds)

    def pieces(request):  # `StreamScheduler.stream`, with the admission wait kept
        sink = Sink()
        scheduler.submit(request, sink)
        while True:
            item = sink.queue.get()
            if isinstance(item, Exception):
                raise item
            yield item.audio
            if item.is_final:
                return

    result = bench.Result(mode="cpu simulation", label=label, requests=len(requests), concurrency=concurrency)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        timings = list(pool.map(lambda request: bench.time_stream(pieces(request)), requests))
        result.wall_seconds = time.perf_counter() - start
    bench.add_stream_timings(result, timings, opening=concurrency)
    result.extra.update(queued_p50_s=float(np.percentile(queued, 50)), queued_p90_s=float(np.percentile(queued, 90)))
    return result


if __name__ == "__main__":
    sys.exit(main())
