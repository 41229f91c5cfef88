#!/usr/bin/env python3
"""Where a first pass over new request lengths is slower than the second: per-request stage times.

    python scripts/cold_pass.py --random-weights F5TTS_v1_Base --compile --cuda-graphs [--requests 24]

Loads the pipeline, runs a server's warm-up (`FlowMatcher.warm_up` over every shape up to the frame limit), then
sends the mixed set's first `--requests` requests one at a time, twice. Each request prints its audio length and
its wall time split into text embedding, the rest of flow matching (the ODE solve) and the vocoder, each
CUDA-synchronized; the summary gives medians per pass. A stage much slower in pass 1 than in pass 2 pays for
something per new length (a compile, a CUDA-graph capture, a cuDNN plan). docs/benchmarks.md, "The cold first pass".
"""

import argparse
import statistics
import sys
import time

import torch

import _checkout  # noqa: F401  (benchmarks/ beside the package)
from benchmarks import bench
from f5_triton.config import DEFAULT_LIMITS, DEFAULT_SAMPLING
from f5_triton.model_paths import add_model_args
from f5_triton.request import validate_request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    bench.add_engine_args(parser)
    parser.add_argument("--requests", type=int, default=24, help="requests of the mixed set, each sent alone")
    parser.add_argument("--nfe", type=int, default=DEFAULT_SAMPLING.nfe_steps)
    parser.add_argument("--warmup-requests", type=int, default=16, help="the server's max batch size")
    args = parser.parse_args()
    tts, _ = bench.tts_from_args(args)
    device = str(tts.flow_matching.device)
    start = time.perf_counter()
    tts.flow_matching.warm_up(args.warmup_requests, nfe_steps=args.nfe, max_frames=DEFAULT_LIMITS.max_mel_frames,
                              log=lambda message: print(f"warm-up: {message}", flush=True))
    print(f"warm-up: {time.perf_counter() - start:.1f} s", flush=True)

    seconds: dict[str, float] = {}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def timed(name, fn):
        def call(*args, **kwargs):
            sync()
            begin = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - begin
        return call

    model = tts.flow_matching.model
    model.embed_text = timed("embed", model.embed_text)
    tts.flow_matching, tts.vocoder = timed("flow", tts.flow_matching), timed("vocoder", tts.vocoder)
    items = bench.mixed_items(args.requests)
    rows = {1: [], 2: []}
    for number in rows:
        for i, item in enumerate(items):
            seconds.clear()
            request = validate_request(item.wave, item.reference_text, item.target_text, sample_rate=item.sample_rate,
                                       nfe_steps=args.nfe, seed=i)
            sync()
            begin = time.perf_counter()
            audio = tts.synthesize([request])[0]
            sync()
            row = {"audio": len(audio) / 24000, "total": time.perf_counter() - begin, "embed": seconds["embed"],
                   "solve": seconds["flow"] - seconds["embed"], "vocoder": seconds["vocoder"]}
            rows[number].append(row)
            print(f"pass {number} request {i:2d}: {row['audio']:5.1f} s of audio, "
                  + ", ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in row.items() if k != "audio"), flush=True)
    for number, passed in rows.items():
        audio = sum(r["audio"] for r in passed)
        print(f"pass {number}: RTF {sum(r['total'] for r in passed) / audio:.4f}; median ms: "
              + ", ".join(f"{k} {statistics.median(r[k] for r in passed) * 1e3:.1f}"
                          for k in ("total", "embed", "solve", "vocoder")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
