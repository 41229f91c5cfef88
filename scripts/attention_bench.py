#!/usr/bin/env python3
"""How to keep padded keys out of attention on a GPU: the candidates, timed at the DiT's shapes.

    python scripts/attention_bench.py --frames 1408 --rows 2,16

Rows of a CUDA-graph bucket are padded, so the DiT must ignore padded keys. Candidates: no mask at
all (the lower bound, wrong for padded rows), a key-bias channel (`attention_with_key_bias` below),
SDPA's own boolean / additive masks under each backend, flash-attention varlen with the padding as
extra sequences, and FlexAttention with a block mask of valid keys (skips fully padded blocks). Prints ms
per call and whether each result equals the masked reference.
"""

import argparse
import functools

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import _checkout  # noqa: F401  (benchmarks/ beside the package)
from benchmarks.bench import gpu_time_ms


def attention_with_key_bias(q, k, v, key_valid: torch.Tensor) -> torch.Tensor:
    """SDPA that ignores padded keys without an attention mask, so the fast (flash/cuDNN) kernels run.

    (The package ran this where cuDNN's attention cannot take the mask, before `Kernels`: SDPA then picks the
    memory-efficient kernel for a masked call, ~3x slower on Hopper.) One extra channel carries the mask into the
    scores: q gets a 1, k gets 0 (valid) or -30000 (padded), so q.k gains exactly 0 or
    a large negative bias; channels are padded to a multiple of 8 for the kernels and dropped after.
    key_valid: [b, n] bool.
    """
    head_dim = q.shape[-1]
    extra = 8
    bias = (~key_valid).to(q.dtype) * -30000.0  # [b, n]
    b, h, n, _ = k.shape
    q_pad = torch.zeros(b, h, n, extra, dtype=q.dtype, device=q.device)
    q_pad[..., 0] = 1
    k_pad = torch.zeros(b, h, n, extra, dtype=k.dtype, device=k.device)
    k_pad[..., 0] = bias[:, None, :]
    q = torch.cat((q, q_pad), dim=-1)
    k = torch.cat((k, k_pad), dim=-1)
    v = torch.cat((v, torch.zeros_like(k_pad)), dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, scale=head_dim ** -0.5)
    return out[..., :head_dim]


def varlen_padded(q, k, v, lengths):
    """Flash varlen over [b*n] tokens: each row's valid frames are one sequence, its padding another."""
    from torch.nn.attention.varlen import varlen_attn

    b, h, n, d = q.shape
    starts = torch.arange(b, device=q.device, dtype=torch.int32) * n
    cu = torch.stack((starts, starts + lengths.int()), dim=1).flatten()
    cu = torch.cat((cu, cu.new_tensor([b * n])))
    pack = lambda t: t.transpose(1, 2).reshape(b * n, h, d)  # noqa: E731
    out = varlen_attn(pack(q), pack(k), pack(v), cu, cu, n, n)
    return out.view(b, n, h, d).transpose(1, 2)


def valid_key_blocks(lengths, frames, skip_padded_queries=False):
    """FlexAttention block mask of each row's valid keys (and queries): fully padded blocks are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def keep(b, h, q_idx, kv_idx):
        valid = kv_idx < lengths[b]
        return valid & (q_idx < lengths[b]) if skip_padded_queries else valid
    return create_block_mask(keep, lengths.shape[0], None, frames, frames, device=lengths.device)


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_padded(q, k, v, block_mask):
    return compiled_flex()(q, k, v, block_mask=block_mask)


def prebuilt_flex(q, k, v, lengths):
    """flex_padded with the block mask built on the first call only (the first call is not timed)."""
    block_mask = []

    def run():
        if not block_mask:
            block_mask.append(valid_key_blocks(lengths, k.shape[2]))
        return flex_padded(q, k, v, block_mask[0])
    return run


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=1408)
    p.add_argument("--rows", default="2,16")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    args = p.parse_args()
    n, h, d = args.frames, args.heads, args.head_dim
    for b in [int(r) for r in args.rows.split(",")]:
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
        lengths = torch.full((b,), n - 47, device="cuda")
        lengths[b // 2:] = n - 300
        valid = torch.arange(n, device="cuda")[None, :] < lengths[:, None]
        bool_mask = valid[:, None, None, :]
        add_mask = torch.zeros(b, 1, 1, n, device="cuda", dtype=q.dtype).masked_fill(~bool_mask, float("-inf"))
        with sdpa_kernel(SDPBackend.MATH):
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bool_mask).half()
        flops = 4 * b * h * n * n * d
        print(f"\n== {b} rows x {h} heads x {n} frames x {d} (padding: {n - lengths.min().item()} frames max)")
        cases = {
            "no mask (lower bound, not exact)": lambda: F.scaled_dot_product_attention(q, k, v),
            "key-bias channel": lambda: attention_with_key_bias(q, k, v, valid),
            "varlen flash, padding as sequences": lambda: varlen_padded(q, k, v, lengths),
            "flex, key block mask (mask built per call)": lambda: flex_padded(q, k, v, valid_key_blocks(lengths, n)),
            "flex, key+query block mask (per call)": lambda: flex_padded(q, k, v, valid_key_blocks(lengths, n, True)),
            "flex, key block mask (prebuilt)": prebuilt_flex(q, k, v, lengths),
        }
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION):
            for label, mask in (("bool", bool_mask), ("additive", add_mask)):
                def run(backend=backend, mask=mask):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                cases[f"sdpa {backend.name} {label} mask"] = run
        for name, fn in cases.items():
            try:
                out = fn()
                ms = gpu_time_ms(fn)
                err = (out.float() - reference.float())[valid[:, None, :, None].expand_as(out)].abs().max().item()
                print(f"  {name:42s} {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  max err (valid) {err:.4f}")
            except Exception as exc:  # a backend that refuses these inputs
                print(f"  {name:42s} unavailable: {str(exc).splitlines()[0][:90]}")


if __name__ == "__main__":
    main()
