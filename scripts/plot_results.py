#!/usr/bin/env python3
"""Bar chart of benchmark.py JSON rows (`--output-json`) from one or more runs, e.g. one GPU vs two; streaming
rows (`--streaming`) as first-audio and throughput curves over the concurrency sweep; open-loop rows
(`--request-rate`) as first audio and the stalled and refused shares against the offered rate.

    python scripts/plot_results.py bench_out/multigpu.jsonl --output multigpu.png
    python scripts/plot_results.py before.jsonl:" (before)" after.jsonl --output compare.png

A `file:suffix` argument appends the suffix to that file's labels.
"""

import argparse
import json

import _checkout  # noqa: F401  (benchmarks/ beside the package)
from benchmarks.bench import plot_open_loop, plot_runs, plot_streaming


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="JSONL files, optionally file:label-suffix")
    p.add_argument("--output", required=True, help="PNG to write")
    p.add_argument("--title", default="f5-triton through Triton")
    args = p.parse_args()
    rows = []
    for spec in args.files:
        path, _, suffix = spec.partition(":")
        with open(path) as f:
            rows += [{**row, "label": row["label"] + suffix} for row in map(json.loads, filter(str.strip, f))]
    open_loop = [r for r in rows if "request_rate" in (r.get("extra") or {})]
    streaming = [r for r in rows if "first_audio_p90_s" in (r.get("extra") or {})]
    if open_loop:
        plot = plot_open_loop(open_loop, args.output, args.title)
    elif streaming:
        plot = plot_streaming(streaming, args.output, args.title)
    else:
        plot = plot_runs(rows, args.output, args.title)
    print(f"plot: {plot}")


if __name__ == "__main__":
    main()
