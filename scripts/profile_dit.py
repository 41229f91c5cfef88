#!/usr/bin/env python3
"""Where a DiT step's GPU time goes: top kernels (torch.profiler) and attention backends with/without a mask.

    python scripts/profile_dit.py --arch F5TTS_v1_Base --frames 1361 --requests 1,8
"""

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from f5_triton.checkpoints import random_dit
from f5_triton.config import ARCHITECTURES


def bench(fn, repeats=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="F5TTS_v1_Base")
    p.add_argument("--frames", type=int, default=1361)
    p.add_argument("--requests", default="1,8")
    p.add_argument("--dtype", default="fp16")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    config = ARCHITECTURES[args.arch]
    model = random_dit(config).to("cuda", dtype)
    step = torch.compile(model.step) if args.compile else model.step
    n = args.frames
    for requests in [int(r) for r in args.requests.split(",")]:
        b = 2 * requests
        x = torch.randn(b, n, config.mel_dim, device="cuda", dtype=dtype)
        te = torch.randn(b, n, config.text_dim, device="cuda", dtype=dtype)
        t = torch.rand(b, device="cuda", dtype=dtype)
        mask = torch.ones(b, n, dtype=torch.bool, device="cuda")
        with torch.inference_mode():
            no_mask = bench(lambda: step(x, x, te, t, None))
            with_mask = bench(lambda: step(x, x, te, t, mask))
            print(f"\n== {requests} requests (batch {b}) x {n} frames, {args.dtype}, compile={args.compile}: "
                  f"step {no_mask:.2f} ms without mask, {with_mask:.2f} ms with mask")
            q = torch.randn(b, config.heads, n, config.dim_head, device="cuda", dtype=dtype)
            key_mask = mask[:, None, None, :]
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
                for m in (None, key_mask):
                    try:
                        with sdpa_kernel(backend):
                            ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=m))
                        print(f"  sdpa {backend.name:20s} mask={m is not None}: {ms * config.depth:.2f} ms per step")
                    except RuntimeError as exc:
                        print(f"  sdpa {backend.name:20s} mask={m is not None}: unsupported ({str(exc)[:60]})")
            for label, m in (("no mask", None), ("mask", mask)):
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        step(x, x, te, t, m)
                    torch.cuda.synchronize()
                print(f"  -- top kernels ({label}), 3 steps")
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
