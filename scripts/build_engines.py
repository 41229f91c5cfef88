#!/usr/bin/env python3
"""Build TensorRT engines (.plan) from the ONNX files of scripts/export_onnx.py, strongly typed.

    python scripts/export_onnx.py --ckpt-dir ckpts/F5TTS_v1_Base --output-dir onnx --fp16
    python scripts/build_engines.py --onnx-dir onnx --output-dir plans --onnx-suffix .fp16
    python scripts/build_engines.py --onnx-dir onnx --output-dir plans --max-requests 8 --max-frames 4096 --workspace-gib 4

Writes OUTPUT/dit_step.plan, OUTPUT/vocoder.plan and OUTPUT/build_info.json (per network: TensorRT
flavour and version, inputs and outputs as the builder parsed them, profile ranges, builder flags).
Precision is the ONNX file's: `--onnx-suffix .fp16` builds FP16 plans from the fp16 export (with its
fp32 islands), no suffix builds FP32 plans. The builder sets no precision flag (TensorRT 11.x and
TensorRT-RTX have none). Either TensorRT works: `tensorrt` (10.x / 11.x) when it imports with its
real API, else `tensorrt_rtx` (TensorRT for RTX); `--tensorrt` (or $F5_TENSORRT) forces one.

Shape limits are in *requests* and mel frames (1 frame = 256 samples at 24 kHz, 4096 frames ~ 43.7 s).
The DiT step evaluates the conditional and the unconditional branch of each request as one batch
(classifier-free guidance), so its engine's batch axis is built for 2 x the requests; its minimum
stays 1 (guidance off). Defaults fit a Jetson Orin 8 GB: up to 4 requests of up to 4096 frames,
1 GiB builder workspace. A TensorRT plan runs only with the TensorRT version and GPU model it was
built on: build it on the serving machine (it needs that GPU). A TensorRT-RTX plan runs with the
same TensorRT-RTX version on any GPU it supports (compute capability 8.0, 8.6, 8.9, 12.x), and its
builder needs no GPU.
"""

import argparse
import sys
from pathlib import Path

from f5_triton.config import DEFAULT_LIMITS
from f5_triton.engines.base import NETWORKS, EngineUnavailable


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir", required=True, help="folder with dit_step.onnx / vocoder.onnx")
    parser.add_argument("--output-dir", required=True, help="folder for the .plan files")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--onnx-suffix", default="",
                        help="build from NAME<suffix>.onnx: '.fp16' for FP16 plans (default: the fp32 files)")
    parser.add_argument("--tensorrt", choices=["auto", "tensorrt", "tensorrt-rtx"],
                        help="TensorRT flavour (default: $F5_TENSORRT, else auto: tensorrt when it imports with "
                             "its real API, else tensorrt-rtx)")
    limits = parser.add_argument_group("optimization profile (requests, not DiT batch rows)")
    limits.add_argument("--min-requests", type=int, default=1)
    limits.add_argument("--opt-requests", type=int, default=1)
    limits.add_argument("--max-requests", type=int, default=4)
    limits.add_argument("--min-frames", type=int, default=1)
    limits.add_argument("--opt-frames", type=int, help="default: 1024, or --max-frames when smaller")
    limits.add_argument("--max-frames", type=int, default=DEFAULT_LIMITS.max_mel_frames)
    parser.add_argument("--workspace-gib", type=float, default=1.0, help="builder workspace limit (GiB)")
    parser.add_argument("--timing-cache", type=Path, help="TensorRT's timing cache file, loaded if present and saved "
                        "after (default: OUTPUT_DIR/timing.cache; TensorRT-RTX has none)")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose log")
    args = parser.parse_args()

    from f5_triton.engines.tensorrt_engine import describe, import_tensorrt

    try:
        trt = import_tensorrt(args.tensorrt)  # first: without TensorRT nothing below can succeed
    except EngineUnavailable as exc:
        print(f"build_engines: error: cannot build TensorRT engines: {exc}", file=sys.stderr)
        return 3
    print(f"build_engines: {describe(trt)} ({trt.__file__})")

    from f5_triton.export.tensorrt_build import BuildOptions, ShapeRange, build_engines

    try:
        options = BuildOptions(
            requests=ShapeRange(args.min_requests, args.opt_requests, args.max_requests),
            frames=ShapeRange(args.min_frames, args.opt_frames or min(1024, args.max_frames), args.max_frames),
            tensorrt=args.tensorrt, workspace_gib=args.workspace_gib,
            timing_cache=args.timing_cache or Path(args.output_dir) / "timing.cache", verbose=args.verbose)
        build_engines(args.onnx_dir, args.output_dir, args.networks, options, args.onnx_suffix)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"build_engines: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
