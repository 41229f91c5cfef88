#!/usr/bin/env python3
"""Time to first audio of streaming synthesis, in process (what `f5_tts_streaming` runs per request).

    python scripts/streaming_latency.py --ckpt-dir ckpts/F5TTS_v1_Base --device cuda --dtype fp16 --nfe 16
    python scripts/streaming_latency.py --random-weights F5TTS_v1_Base --device cuda --nfe 32 --json out.json
    python scripts/streaming_latency.py --random-weights F5TTS_v1_Base --device cuda --first-chunk-nfe-steps 7

The default text makes about 30 s of audio; the reference defaults to examples/basic_ref_en.flac.
Prints the median / min / max time to first audio and the total time and real-time factor. With
--first-chunk-nfe-steps (opt-in: the first chunk on fewer steps) the default is timed in the same run too, and the
audio's relative L2 distance from the default's (same seed) is printed: its quality cannot be judged without the
published weights. Against a running server use `client_grpc.py --streaming` instead (it reports the same
first-audio time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import numpy as np

import _checkout  # noqa: F401  (benchmarks/ beside the package)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE = REPO / "examples" / "basic_ref_en.flac"
DEFAULT_REFERENCE_TEXT = "Some call me nature, others call me mother nature."
# 300 bytes: about 30 s of audio with the default reference (durations follow the reference's pace).
THIRTY_SECONDS = (
    "Streaming speech should start quickly. The first sentence is short, so the listener hears it almost at "
    "once, while the rest is still being generated. Each following chunk is cross-faded into the one before "
    "it, so that the joins cannot be heard, and the whole passage is finished faster than it plays.")


def build(args):
    """The streaming synthesizer over the pipeline the engine options describe."""
    from benchmarks.bench import tts_from_args
    from f5_triton.config import StreamingConfig
    from f5_triton.streaming import StreamingSynthesizer
    from f5_triton.text import StreamingChunker

    tts, args.dtype = tts_from_args(args)
    return StreamingSynthesizer(tts.stages(StreamingChunker(StreamingConfig(first_chunk_bytes=args.first_chunk_bytes))),
                                first_chunk_nfe_steps=args.first_chunk_nfe_steps)


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench import add_engine_args
    from f5_triton.config import DEFAULT_SAMPLING, DEFAULT_STREAMING
    from f5_triton.model_paths import add_model_args

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    add_engine_args(parser)
    parser.add_argument("--reference-audio", default=str(DEFAULT_REFERENCE))
    parser.add_argument("--reference-text", default=DEFAULT_REFERENCE_TEXT)
    parser.add_argument("--text", default=THIRTY_SECONDS, help="text to speak (default: ~30 s of speech)")
    parser.add_argument("--nfe", type=int, default=DEFAULT_SAMPLING.nfe_steps)
    parser.add_argument("--first-chunk-bytes", type=int, default=DEFAULT_STREAMING.first_chunk_bytes)
    parser.add_argument("--first-chunk-nfe-steps", type=int, default=DEFAULT_STREAMING.first_chunk_nfe_steps,
                        help="opt-in: the first chunk on this many ODE steps (0: off); also times the default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", help="write the runs here")
    args = parser.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = "fp32" if args.device == "cpu" else (args.dtype or "fp16")

    from f5_triton.audio import read_audio
    from f5_triton.request import validate_request
    from f5_triton.streaming import StreamingSynthesizer, time_to_first_audio

    streamer = build(args)
    wave, rate = read_audio(args.reference_audio)
    # no seed: the output cache (off here anyway) must never turn a repeat into a replay
    request = validate_request(wave, args.reference_text, args.text, sample_rate=rate, nfe_steps=args.nfe)
    chunks = streamer.stages.preprocess(request).chunks
    synchronize = lambda: None  # noqa: E731
    if args.device.startswith("cuda"):
        synchronize = torch.cuda.synchronize
    print(f"{len(chunks)} chunks, first: {chunks[0]!r}")
    report = {"nfe": args.nfe, "dtype": args.dtype, "chunks": chunks}
    streamers = {("", "runs"): streamer}
    if streamer.first_chunk_nfe_steps:  # the default beside it, in the same run
        streamers = {("default: ", "default_runs"): StreamingSynthesizer(streamer.stages),
                     (f"first chunk on {streamer.first_chunk_nfe_steps} steps: ", "runs"): streamer}
    for (label, key), each in streamers.items():
        runs = time_to_first_audio(each, request, repeats=args.repeats, warmup=args.warmup, synchronize=synchronize)
        first = [1000 * r.first_audio for r in runs]
        print(f"{label}time to first audio: median {statistics.median(first):.1f} ms (min {min(first):.1f}, "
              f"max {max(first):.1f}) over {len(runs)} runs, nfe {args.nfe}, {args.dtype}")
        total = statistics.median(r.total for r in runs)
        print(f"{label}whole text: {total:.2f} s for {runs[0].audio_seconds:.1f} s of audio "
              f"(RTF {total / runs[0].audio_seconds:.3f})")
        report[key] = [{"first_audio_s": r.first_audio, "total_s": r.total,
                                                 "audio_s": r.audio_seconds, "pieces": r.pieces} for r in runs]
    if len(streamers) == 2:
        from benchmarks.bench import rel_l2

        seeded = dataclasses.replace(request, seed=0)
        default, fast = ([piece.audio for piece in each.stream(seeded)] for each in streamers.values())
        report["first_piece_rel_l2"] = rel_l2(fast[0], default[0])
        report["whole_rel_l2"] = rel_l2(np.concatenate(fast), np.concatenate(default))
        print(f"distance from the default (same seed): first piece relative L2 {report['first_piece_rel_l2']:.3f}, "
              f"whole audio {report['whole_rel_l2']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
