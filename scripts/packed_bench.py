#!/usr/bin/env python3
"""Packed DiT batches on mixed lengths: the attention candidates, then the packed step against the padded one.

    python scripts/packed_bench.py --requests 1,8,16 [--arch F5TTS_v1_Base] [--json out.json]
    python scripts/packed_bench.py --requests 8,16 --frames 850 --parts steps --launch engine,static --profile

Lengths are drawn as in benchmark.py's mixed set (references 3-10 s + targets 2-20 s, in frames); each
request is two sequences (classifier-free guidance). Attention candidates on [tokens, heads, 64]: the
variable-length flash kernel (`varlen_attn`), FlashAttention-4's (where flash-attn-4 is installed), FlexAttention
with a document block mask, SDPA on nested jagged tensors, cuDNN on ragged sequences, SDPA per sequence, and the
padded call (cuDNN with a key mask over [2B, n]; FA4 with each row's key count); each
checked against fp32 math per sequence. Then whole DiT steps: padded+masked and packed, eager and
compiled with symbolic shapes (`compiled`: dynamic=True; `engine`: the lengths marked dynamic as the torch engine
does; `static`: specialized on the batch), ms per step, MFU and the largest difference of the packed output from
the padded one (fp16). `--frames N` gives every request N frames instead (a burst of streaming first chunks: the
5 s reference and a first sentence are ~850); `--profile` adds where a compiled packed step's GPU time goes.
"""

import argparse
import dataclasses
import functools
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import _checkout  # noqa: F401  (benchmarks/ beside the package)
from benchmarks.bench import MIXED_REFERENCE_SECONDS, MIXED_TARGET_SECONDS, dit_step_flops, gpu_time_ms, matmul_peak_tflops
from f5_triton.checkpoints import random_dit
from f5_triton.config import ARCHITECTURES, HOP_LENGTH, SAMPLE_RATE
from f5_triton.model import fa4
from f5_triton.model.dit import PACKED_ATTENTION_KERNELS, packed_attention
from f5_triton.model.packing import Packing


def mixed_frames(requests: int, seed: int = 0, frames: int | None = None) -> list[int]:
    """Frames of `requests` requests: drawn as the mixed set's, or `frames` each."""
    if frames:
        return [frames] * requests
    rng = np.random.default_rng(seed)
    seconds = rng.uniform(*MIXED_REFERENCE_SECONDS, requests) + rng.uniform(*MIXED_TARGET_SECONDS, requests)
    return [int(s * SAMPLE_RATE / HOP_LENGTH) for s in seconds]


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def attention_cases(q, k, v, packing: Packing, padded):
    """name -> fn() returning [tokens, heads, dim]."""
    from torch.nn.attention.varlen import varlen_attn

    cu, n = packing.cu_seqlens, packing.max_length
    cases = {"varlen flash (varlen_attn)": lambda: varlen_attn(q, k, v, cu, cu, n, n)}

    block_mask = []

    def flex():
        from torch.nn.attention.flex_attention import create_block_mask

        if not block_mask:  # built once per batch (the first, untimed call)
            doc = packing.sequence_ids
            block_mask.append(create_block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], None, None,
                                                q.shape[0], q.shape[0], device=q.device))
        out = compiled_flex()(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask[0])
        return out[0].transpose(0, 1)
    cases["flex, document block mask"] = flex

    def nested():
        offsets = cu.to(torch.int64)
        njt = [torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2) for t in (q, k, v)]
        return F.scaled_dot_product_attention(*njt).transpose(1, 2).values()
    cases["SDPA on nested jagged tensors"] = nested

    if fa4.available():  # FlashAttention-4 (flash-attn-4), through the op the model calls
        cases["FA4 varlen (flash_attn.cute)"] = lambda: packed_attention(q, k, v, packing, "fa4")
    # cuDNN's fused attention on ragged sequences (the op SDPA runs for nested tensors on cuDNN)
    cases["cuDNN ragged (cu_seqlens)"] = lambda: torch.ops.aten._cudnn_attention_forward(
        q, k, v, None, cu, cu, n, n, False, 0.0, False, False)[0]
    cases["SDPA per sequence (loop)"] = lambda: packed_attention(q, k, v, packing, "per_sequence")

    pq, pk, pv, key_mask, valid = padded

    def padded_cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=key_mask)
        return out.transpose(1, 2)[valid]
    cases["padded [2B, n], cuDNN key mask"] = padded_cudnn
    if fa4.available():
        key_lengths = valid.sum(dim=1).to(torch.int32)
        batched = [t.transpose(1, 2) for t in (pq, pk, pv)]  # [2B, n, heads, dim], as the padded step holds them
        cases["padded [2B, n], FA4 key lengths"] = lambda: fa4.padded_attention(*batched, key_lengths)[valid]
    return cases


def bench_attention(requests: int, heads: int, dim: int, rows: list, frames: int | None = None):
    lengths = [n for n in mixed_frames(requests, frames=frames) for _ in range(2)]
    packing = Packing.of(lengths, "cuda")
    torch.manual_seed(0)
    q, k, v = (torch.randn(packing.tokens, heads, dim, device="cuda", dtype=torch.float16) for _ in range(3))
    b, n = len(lengths), max(lengths)
    valid = torch.arange(n, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    pad = lambda t: torch.zeros(b, n, heads, dim, device="cuda", dtype=t.dtype).masked_scatter(  # noqa: E731
        valid[..., None, None], t).transpose(1, 2)
    key_mask = torch.zeros(b, 1, 1, n, device="cuda", dtype=q.dtype).masked_fill(~valid[:, None, None, :], float("-inf"))
    reference = packed_attention(q.float(), k.float(), v.float(), packing, "per_sequence")
    useful = 4 * heads * dim * sum(n * n for n in lengths)
    print(f"\n== attention: {requests} requests, {b} sequences of {min(lengths)}-{n} frames, {packing.tokens} tokens "
          f"(padded: {b * n}, {100 * packing.tokens / (b * n):.0f} % useful)")
    for name, fn in attention_cases(q, k, v, packing, (pad(q), pad(k), pad(v), key_mask, valid)).items():
        try:
            out = fn()
            ms = gpu_time_ms(fn)
            err = float((out.float() - reference).abs().max())
            print(f"  {name:40s} {ms:8.3f} ms  {useful / ms / 1e9:6.0f} useful TFLOP/s  max err {err:.4f}")
            rows.append(dict(kind="attention", requests=requests, case=name, ms=ms, max_err=err))
        except Exception as exc:  # a kernel that refuses these inputs
            print(f"  {name:40s} unavailable: {str(exc).splitlines()[0][:100]}")
            rows.append(dict(kind="attention", requests=requests, case=name, error=str(exc)[:300]))


def compiled_step(model, launch: str):
    """model.step as `launch` runs it: eager, compiled with dynamic=True, as the torch engine compiles it, static."""
    if launch == "eager":
        return model.step
    if launch == "engine":
        from f5_triton.engines.base import DIT_STEP
        from f5_triton.engines.torch_engine import _lengths_dynamic

        return _lengths_dynamic(torch.compile(model.step), DIT_STEP)
    return torch.compile(model.step, dynamic={"compiled": True, "static": False}[launch])


KERNEL_KINDS = (("attention", ("flash", "fmha", "attn", "sdpa")), ("convolution", ("conv", "fprop", "dgrad")),
                ("GEMM", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "sm90_")), ("fused (triton)", ("triton",)),
                ("copy / index", ("copy", "index", "cat", "elementwise", "fill", "gather", "scatter")))


def kernel_kind(name: str) -> str:
    name = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key in name for key in keys)), "other")


def profile_step(fn, label: str, rows: list, calls: int = 3):
    """Where `fn`'s GPU time goes: shares by kernel kind and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels, not the ops above them
    kernels = [(e.key, e.device_time_total / calls / 1e3, max(1, e.count // calls)) for e in on_gpu or events]
    total = sum(ms for _, ms, _ in kernels)
    kinds: dict[str, float] = {}
    for name, ms, _ in kernels:
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + ms
    print(f"    GPU time by kernel kind ({label}, {total:.2f} ms a step): " + ", ".join(
        f"{kind} {ms:.2f} ms ({100 * ms / total:.0f} %)" for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])))
    for name, ms, count in sorted(kernels, key=lambda k: -k[1])[:12]:
        print(f"      {ms:7.3f} ms {count:4d}x  {kernel_kind(name):14s} {name[:90]}")
    rows.append(dict(kind="profile", label=label, total_ms=total, by_kind=kinds,
                     top=[dict(name=n[:200], ms=ms, count=c) for n, ms, c in sorted(kernels, key=lambda k: -k[1])[:20]]))


def bench_steps(model, config, requests_list, launches, rows, frames=None, profiling=False, padded=True):
    dtype = next(model.parameters()).dtype
    peak = matmul_peak_tflops()
    print(f"measured bf16 matmul peak: {peak:.0f} TFLOP/s")
    steps = {launch: compiled_step(model, launch) for launch in launches}
    for requests in requests_list:
        lengths = [n for n in mixed_frames(requests, frames=frames) for _ in range(2)]
        b, n = len(lengths), max(lengths)
        packing = Packing.of(lengths, "cuda")
        torch.manual_seed(1)
        mask = torch.arange(n, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
        x, cond = (torch.randn(b, n, config.mel_dim, device="cuda", dtype=dtype) * mask[..., None] for _ in range(2))
        te = torch.randn(b, n, config.text_dim, device="cuda", dtype=dtype) * mask[..., None]
        t = torch.rand(b, device="cuda", dtype=dtype)
        print(f"\n== DiT step: {requests} requests, {b} sequences, {packing.tokens} tokens packed, {b * n} padded")
        flops = sum(dit_step_flops(config, n, n) for n in lengths)
        for launch, step in steps.items():
            try:
                measure_step(launch, step, x, cond, te, t, mask, packing, requests, rows, flops / peak / 1e9,
                             padded)
                if profiling and launch != "eager":
                    with torch.inference_mode():
                        profile_step(lambda: step(x[mask], cond[mask], te[mask], t, packing),
                                     f"{launch}, packed, {requests} requests", rows)
            except Exception as exc:  # report and go on with the other launches
                print(f"  {launch:8s} failed: {type(exc).__name__}: {str(exc)[:400]}")
                rows.append(dict(kind="step", requests=requests, launch=launch, error=str(exc)[:1000]))


def measure_step(launch, step, x, cond, te, t, mask, packing, requests, rows, ideal_ms: float, padded: bool = True):
    """ideal_ms: the packed step's FLOPs at the measured matmul peak (its MFU is ideal_ms / ms)."""
    b, n = mask.shape
    packed = (x[mask], cond[mask], te[mask], t, packing)
    with torch.inference_mode():
        start = time.perf_counter()
        padded_out = step(x, cond, te, t, mask) if padded else None
        torch.cuda.synchronize()
        first_padded = time.perf_counter() - start
        padded_ms = gpu_time_ms(lambda: step(x, cond, te, t, mask), repeats=10) if padded else float("nan")
        start = time.perf_counter()
        packed_out = step(*packed)
        torch.cuda.synchronize()
        first_packed = time.perf_counter() - start
        packed_ms = gpu_time_ms(lambda: step(*packed), repeats=10)
        diff = float((packed_out.float() - padded_out[mask].float()).abs().max()) if padded else float("nan")
    print(f"  {launch:8s} padded+masked {padded_ms:8.2f} ms  packed {packed_ms:8.2f} ms  "
          f"({padded_ms / packed_ms:.2f}x, packed MFU {100 * ideal_ms / packed_ms:.0f} %)  "
          f"first call {first_padded:.1f} / {first_packed:.1f} s  "
          f"max |packed - padded| {diff:.4f}")
    rows.append(dict(kind="step", requests=requests, launch=launch, tokens=packing.tokens, padded_rows=b * n,
                     padded_ms=padded_ms, packed_ms=packed_ms, first_padded_s=first_padded,
                     first_packed_s=first_packed, max_diff=diff, packed_mfu=ideal_ms / packed_ms))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="F5TTS_v1_Base")
    p.add_argument("--requests", default="1,8,16")
    p.add_argument("--parts", default="attention,steps")
    p.add_argument("--launch", default="eager,compiled", help="comma list of eager, compiled, engine, static")
    p.add_argument("--frames", type=int, help="every request this many frames (default: the mixed set's lengths)")
    p.add_argument("--kernel", choices=PACKED_ATTENTION_KERNELS,
                   help="the packed attention kernel of the steps (default: what optimize_for picks)")
    p.add_argument("--packed-only", action="store_true", help="steps: the packed step alone (no padded comparison)")
    p.add_argument("--profile", action="store_true", help="where each compiled packed step's GPU time goes")
    p.add_argument("--json")
    args = p.parse_args()
    config = ARCHITECTURES[args.arch]
    requests_list = [int(r) for r in args.requests.split(",")]
    rows = []
    if "attention" in args.parts:
        for requests in requests_list:
            bench_attention(requests, config.heads, config.dim_head, rows, args.frames)
    if "steps" in args.parts:
        model = random_dit(config).optimize_for("cuda", torch.float16)
        if args.kernel:  # a knob of this script only: the package chooses kernels once, in optimize_for
            model.kernels = dataclasses.replace(model.kernels, packed=args.kernel)
        print(f"\npacked attention kernel: {model.kernels.packed}")
        bench_steps(model, config, requests_list, args.launch.split(","), rows, args.frames, args.profile,
                    not args.packed_only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
