#!/usr/bin/env python3
"""Where a DiT step's GPU time goes: compiled + graphed step times, MFU, kernel A/B, and the top kernels.

    python scripts/profile_dit.py --arch F5TTS_v1_Base --frames 1361 --requests 1,8,16 [--json out.json]

Variants (each on the same random weights, optimized for the GPU as load_dit does: `DiT.optimize_for`):
`base` = without the GELU GEMM epilogue, `epilogue` = the kernels load_dit chooses, `sdpa` = epilogue, with masked
steps through SDPA's own choice for a boolean mask instead of cuDNN. The variants replace the model's `kernels`
(`model.dit.Kernels`): a knob for this profiling script only; the package chooses them once, in `optimize_for`.
`--launch graph,plain,dynamic,dynamic8` also times each variant compiled without a CUDA graph, static or with
symbolic shapes (the engine's compiled step after its second shape: batches above `graph_max_rows`);
`dynamic8` passes frames as [frames / 8, 8] so the compiled step knows they are a multiple of 8.
"""

import argparse
import copy
import dataclasses
import json

import torch
from torch.profiler import ProfilerActivity, profile

import _checkout  # noqa: F401  (benchmarks/ beside the package)
from benchmarks.bench import dit_step_flops, gpu_time_ms, matmul_peak_tflops
from f5_triton.checkpoints import random_dit
from f5_triton.config import ARCHITECTURES

VARIANTS = {"base": {"gelu_epilogue": False}, "epilogue": {}, "sdpa": {"padded": "sdpa"}}


def with_kernels(model, **changes):
    """A copy of `model` (sharing its weights) whose kernels differ from those `optimize_for` chose by `changes`."""
    variant = copy.copy(model)
    variant.kernels = dataclasses.replace(model.kernels, **changes)
    return variant


def plain(fn, *args):
    """fn(*args) without a graph (launches from Python each call); same interface as `graphed`."""
    for _ in range(3):
        fn(*args)
    out = fn(*args)
    return (lambda: fn(*args)), out


def frames_by_8(step):
    """`step` taking frames as [frames / 8, 8]: symbolic frames become 8 * s, provably aligned."""
    def step8(x, cond, text_embed, time, mask=None):
        return step(x.flatten(1, 2), cond.flatten(1, 2), text_embed.flatten(1, 2), time,
                    None if mask is None else mask.flatten(1, 2))
    return step8


def by_8(*tensors):
    return [None if t is None else t.unflatten(1, (t.shape[1] // 8, 8)) if t.dim() > 1 else t for t in tensors]


def graphed(fn, *args):
    """fn(*args) captured as a CUDA graph; returns a replay function and the graph's output."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*args)
    return g.replay, out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="F5TTS_v1_Base")
    p.add_argument("--frames", type=int, default=1361)
    p.add_argument("--requests", default="1,8,16")
    p.add_argument("--variants", default="base,epilogue")
    p.add_argument("--launch", default="graph", help="comma-separated: graph; plain (compiled, no CUDA graph); "
                   "dynamic (compiled with symbolic shapes, no graph: what batches above graph_max_rows run); "
                   "dynamic8 (dynamic, frames passed as [frames / 8, 8])")
    p.add_argument("--mode", default="default", help="torch.compile mode (max-autotune-no-cudagraphs compiles for minutes)")
    p.add_argument("--table", action="store_true", help="print the top kernels of the last variant per batch")
    p.add_argument("--json")
    args = p.parse_args()
    dtype = torch.float16
    config = ARCHITECTURES[args.arch]
    model = random_dit(config).optimize_for("cuda", dtype)
    n = args.frames
    torch.backends.cudnn.benchmark = True
    peak = matmul_peak_tflops()
    print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")
    rows = []
    for requests in [int(r) for r in args.requests.split(",")]:
        b = 2 * requests  # classifier-free guidance
        x = torch.randn(b, n, config.mel_dim, device="cuda", dtype=dtype)
        te = torch.randn(b, n, config.text_dim, device="cuda", dtype=dtype)
        t = torch.rand(b, device="cuda", dtype=dtype)
        mask = torch.ones(b, n, dtype=torch.bool, device="cuda")
        print(f"\n== {requests} requests (batch {b}) x {n} frames")
        reference = None
        for variant in args.variants.split(","):
            variant_model = with_kernels(model, **VARIANTS[variant])
            for launch in args.launch.split(","):
                torch._dynamo.reset()
                fn = frames_by_8(variant_model.step) if launch == "dynamic8" else variant_model.step
                step = torch.compile(fn, mode=None if args.mode == "default" else args.mode,
                                     dynamic=launch.startswith("dynamic"))
                for label, m in (("no mask", None), ("mask", mask)):
                    with torch.inference_mode():
                        inputs = by_8(x, x, te, t, m) if launch == "dynamic8" else (x, x, te, t, m)
                        replay, out = (graphed if launch == "graph" else plain)(step, *inputs)
                        ms = gpu_time_ms(replay)
                        if label == "mask":
                            reference = out.clone() if reference is None else reference
                            diff = float((out - reference).abs().max())
                    mfu = dit_step_flops(config, b * n, n) / (ms / 1e3) / 1e12 / peak
                    print(f"  {variant:9s} {launch:7s} {label:8s} {ms:7.2f} ms/step  MFU {100 * mfu:5.1f} %"
                          + (f"  max |diff| vs first variant {diff:.2e}" if label == "mask" else ""))
                    rows.append(dict(requests=requests, rows=b, frames=n, variant=variant, launch=launch,
                                     masked=label == "mask", ms=ms, mfu=mfu, peak_tflops=peak))
            if args.table:
                with profile(activities=[ProfilerActivity.CUDA]) as prof, torch.inference_mode():
                    for _ in range(3):
                        replay()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
