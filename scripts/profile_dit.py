#!/usr/bin/env python3
"""Where a DiT step's GPU time goes: compiled step timings, top kernels, and the pieces that matter.

    python scripts/profile_dit.py --arch F5TTS_v1_Base --frames 1361 --requests 1,8
"""

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from f5_triton.bench import gpu_time_ms
from f5_triton.checkpoints import random_dit
from f5_triton.config import ARCHITECTURES


def graphed(fn, *args):
    """fn(*args) captured as a CUDA graph; returns a replay function."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(*args)
    return g.replay


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="F5TTS_v1_Base")
    p.add_argument("--frames", type=int, default=1361)
    p.add_argument("--requests", default="1,8")
    p.add_argument("--modes", default="default,max-autotune-no-cudagraphs")
    args = p.parse_args()
    dtype = torch.float16
    config = ARCHITECTURES[args.arch]
    model = random_dit(config).to("cuda", dtype).eval().fuse_projections().select_attention_kernels()
    n = args.frames
    torch.backends.cudnn.benchmark = True
    for requests in [int(r) for r in args.requests.split(",")]:
        b = 2 * requests
        x = torch.randn(b, n, config.mel_dim, device="cuda", dtype=dtype)
        te = torch.randn(b, n, config.text_dim, device="cuda", dtype=dtype)
        t = torch.rand(b, device="cuda", dtype=dtype)
        mask = torch.ones(b, n, dtype=torch.bool, device="cuda")
        with torch.inference_mode():
            h = torch.randn(b, config.dim, n, device="cuda", dtype=dtype)
            conv = model.input_embed.conv_pos_embed.conv1d[0]
            print(f"\n== {requests} requests (batch {b}) x {n} frames: grouped conv (cudnn.benchmark) "
                  f"{gpu_time_ms(lambda: conv(h)):.3f} ms each, 2 per step")
            for mode in args.modes.split(","):
                torch._dynamo.reset()
                step = torch.compile(model.step, mode=None if mode == "default" else mode, dynamic=False)
                for label, m in (("no mask", None), ("mask", mask)):
                    replay = graphed(step, x, x, te, t, m)
                    ms = gpu_time_ms(replay)
                    print(f"  compile[{mode}] + graph, {label}: {ms:.2f} ms per step")
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        replay()
                    torch.cuda.synchronize()
                print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
