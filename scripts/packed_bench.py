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
5 s reference and a first sentence are ~850).

`--profile` adds where a compiled packed step's GPU time goes, against its roofline (issue 33): the GPU time by kind
of kernel (`bench.STEP_KINDS`; a GEMM by the shapes of the op that launched it), each kind's FLOPs and bytes
(`bench.step_costs`), and ceilings measured on the same card in the same run: the matmul peak in bf16 and in the
model's dtype, the memory bandwidth (a device-to-device copy) and the packed attention kernel on one long sequence.
`--plot PNG` draws the measured ms by kind beside the roofline's. `--count-only` prints the cost table alone (no GPU).
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
from benchmarks.bench import (MIXED_REFERENCE_SECONDS, MIXED_TARGET_SECONDS, dit_step_flops, format_roofline,
                              gpu_time_ms, matmul_peak_tflops, memory_bandwidth_gbps, plot_roofline, roofline,
                              roofline_summary, step_costs, step_kind)
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


def attention_peak_tflops(kernel: str, heads: int, dim_head: int, dtype, tokens: int = 16384) -> float:
    """The packed attention `kernel` at its best: one sequence of `tokens` tokens, TFLOP/s."""
    packing = Packing.of([tokens], "cuda")
    q, k, v = (torch.randn(tokens, heads, dim_head, device="cuda", dtype=dtype) for _ in range(3))
    ms = gpu_time_ms(lambda: packed_attention(q, k, v, packing, kernel))
    return 4 * heads * dim_head * tokens**2 / (ms / 1e3) / 1e12


def measure_ceilings(model, config, profiling: bool) -> dict:
    """The card's matmul peak in bf16 and in the model's dtype (`matmul_tflops`, the denominator of MFU); with
    `profiling` also its memory bandwidth and the packed attention kernel's best case."""
    dtype = next(model.parameters()).dtype
    ceilings = dict(kind="ceilings", device=torch.cuda.get_device_name(), dtype=str(dtype).removeprefix("torch."),
                    matmul_bf16_tflops=matmul_peak_tflops())
    ceilings["matmul_tflops"] = matmul_peak_tflops(dtype=ceilings["dtype"])
    print(f"{ceilings['device']}: measured matmul peak {ceilings['matmul_bf16_tflops']:.0f} TFLOP/s in bf16, "
          f"{ceilings['matmul_tflops']:.0f} in {ceilings['dtype']}")
    if profiling:
        ceilings.update(bandwidth_gbps=memory_bandwidth_gbps(), attention_kernel=model.kernels.packed,
                        attention_tokens=16384)
        ceilings["attention_tflops"] = attention_peak_tflops(model.kernels.packed, config.heads, config.dim_head, dtype,
                                                             ceilings["attention_tokens"])
        print(f"memory bandwidth (device copy) {ceilings['bandwidth_gbps']:.0f} GB/s; packed attention "
              f"({model.kernels.packed}) on one sequence of {ceilings['attention_tokens']} tokens "
              f"{ceilings['attention_tflops']:.0f} TFLOP/s")
    return ceilings


def profile_step(fn, label: str, rows: list, config, lengths: list[int], calls: int = 3) -> dict[str, float]:
    """Where `fn`'s GPU time goes: ms a step by `step_kind` (returned), and the top kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = list(prof.profiler.kineto_results.events())
    # the ops by id (not the runtime calls, which link to them): a kernel's linked id is the op that launched it
    ops = {e.correlation_id(): (e.name(), e.shapes()) for e in events
           if e.device_type() == DeviceType.CPU and e.linked_correlation_id() == 0}
    kernels: dict[tuple[str, str], list] = {}  # (kind, name) -> [ms a step, launches, the launching op]
    for e in events:
        if e.device_type() != DeviceType.CUDA or e.is_user_annotation():
            continue
        op, shapes = ops.get(e.linked_correlation_id(), ("", ()))
        kind = step_kind(config, sum(lengths), len(lengths), e.name(), op, shapes)
        entry = kernels.setdefault((kind, e.name()), [0.0, 0, op])
        entry[0] += e.duration_ns() / 1e6 / calls
        entry[1] += 1
    total = sum(ms for ms, _, _ in kernels.values())
    kinds: dict[str, float] = {}
    for (kind, _), (ms, _, _) in kernels.items():
        kinds[kind] = kinds.get(kind, 0.0) + ms
    print(f"    GPU time by kind ({label}, {total:.2f} ms a step): " + ", ".join(
        f"{kind} {ms:.2f}" for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])))
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:16]
    for (kind, name), (ms, count, op) in top:
        print(f"      {ms:7.3f} ms {max(1, count // calls):4d}x  {kind[:22]:22s} {op[:24]:24s} {name[:70]}")
    rows.append(dict(kind="profile", label=label, total_ms=total, by_kind=kinds,
                     top=[dict(name=name[:200], step_kind=kind, op=op, ms=ms, count=max(1, count // calls))
                          for (kind, name), (ms, count, op) in top]))
    return kinds


def report_roofline(config, lengths, ms_by_kind, step_ms, ceilings, requests, launch, rows):
    """The roofline table of one profiled step (`bench.roofline`) and its summary (`bench.roofline_summary`)."""
    costs = step_costs(config, lengths)
    table = roofline(costs, ms_by_kind, ceilings["matmul_tflops"], ceilings["bandwidth_gbps"])
    summary = roofline_summary(costs, ms_by_kind, step_ms, ceilings)
    print(format_roofline(table))
    print(f"    step {step_ms:.2f} ms (CUDA events; kernels {summary['kernel_ms']:.2f} ms), "
          f"{summary['tflop']:.2f} TFLOP, MFU {100 * summary['mfu']:.1f} %, "
          f"{100 * summary['roofline_share']:.0f} % of the roofline's {summary['bound_ms']:.2f} ms; "
          f"attention {summary['attention_tflops']:.0f} TFLOP/s = "
          f"{100 * summary['attention_share_of_peak']:.0f} % of the matmul peak, "
          f"{100 * summary['attention_share_of_best']:.0f} % of its kernel's best case")
    common = dict(requests=requests, launch=launch, tokens=sum(lengths), sequences=len(lengths))
    rows += [dict(kind="roofline", **common, **row) for row in table]
    rows.append(dict(kind="roofline_step", **common, **summary))


def bench_steps(model, config, requests_list, launches, rows, frames=None, profiling=False, padded=True):
    dtype = next(model.parameters()).dtype
    ceilings = measure_ceilings(model, config, profiling)
    rows.append(ceilings)
    peak = ceilings["matmul_tflops"]
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
        print(f"\n== DiT step: {requests} requests, {b} sequences of {min(lengths)}-{n} frames, {packing.tokens} "
              f"tokens packed, {b * n} padded")
        flops = sum(dit_step_flops(config, n, n) for n in lengths)
        for launch, step in steps.items():
            try:
                step_ms = measure_step(launch, step, x, cond, te, t, mask, packing, requests, rows,
                                       flops / peak / 1e9, padded)
                if profiling and launch != "eager":
                    packed = (x[mask], cond[mask], te[mask], t, packing)  # packed once: only the step is profiled
                    with torch.inference_mode():
                        ms_by_kind = profile_step(lambda: step(*packed), f"{launch}, packed, {requests} requests",
                                                  rows, config, lengths)
                    report_roofline(config, lengths, ms_by_kind, step_ms, ceilings, requests, launch, rows)
            except Exception as exc:  # report and go on with the other launches
                print(f"  {launch:8s} failed: {type(exc).__name__}: {str(exc)[:400]}")
                rows.append(dict(kind="step", requests=requests, launch=launch, error=str(exc)[:1000]))


def measure_step(launch, step, x, cond, te, t, mask, packing, requests, rows, ideal_ms: float, padded: bool = True):
    """ideal_ms: the packed step's FLOPs at the measured matmul peak (its MFU is ideal_ms / ms). Returns the packed
    step's ms."""
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
    return packed_ms


def count_only(config, requests_list, frames, rows):
    """The cost table of each packed step (`bench.step_costs`), without a GPU."""
    for requests in requests_list:
        lengths = [n for n in mixed_frames(requests, frames=frames) for _ in range(2)]
        print(f"\n== cost of one packed step: {requests} requests, {len(lengths)} sequences of "
              f"{min(lengths)}-{max(lengths)} frames, {sum(lengths)} tokens")
        table = roofline(step_costs(config, lengths))
        print(format_roofline(table))
        rows += [dict(kind="cost", requests=requests, tokens=sum(lengths), **row) for row in table]


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
    p.add_argument("--profile", action="store_true",
                   help="where each compiled packed step's GPU time goes, against its roofline")
    p.add_argument("--plot", help="with --profile: PNG of the ms by kind, measured beside the roofline's")
    p.add_argument("--count-only", action="store_true", help="the packed steps' FLOPs and bytes by kind (no GPU)")
    p.add_argument("--json")
    args = p.parse_args()
    config = ARCHITECTURES[args.arch]
    requests_list = [int(r) for r in args.requests.split(",")]
    rows = []
    if args.count_only:
        count_only(config, requests_list, args.frames, rows)
        args.parts = ""
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
    profiled = [row for row in rows if row["kind"] == "roofline"]
    if args.plot and profiled:
        device = next(row["device"] for row in rows if row["kind"] == "ceilings")
        title = f"packed DiT step ({args.arch}, fp16) on {device}: measured ms by kind beside the roofline bound"
        print(f"plot: {plot_roofline(profiled, args.plot, title)}")


if __name__ == "__main__":
    main()
