"""FlashAttention-4's attention (the `flash-attn-4` package, `flash_attn.cute`) as torch ops: variable-length
sequences (a packed batch) and a padded batch whose rows attend to their first `key_lengths` keys.

On Hopper it runs a packed batch's attention ~1.4-1.6x faster than torch's own flash kernel (FlashAttention-2,
`varlen_attn`): docs/benchmarks.md. Its kernels are CuTe DSL code compiled at first use, which torch.compile
cannot trace, so the call is a custom op: opaque to the compiler, with a fake implementation for its shapes.
torch's own FA4 hook (`torch.nn.attention.activate_flash_attention_impl("FA4")`) expects an older return
signature than the released package has, hence this op. Optional: `pip install -e ".[fa4]"` in a clone.
"""

from __future__ import annotations

import torch


def available() -> bool:
    """Whether flash-attn-4 is installed (importable); `works` also runs it."""
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception:  # not installed, or its CUDA libraries do not load here
        return False
    return True


def _flash_attention(q, k, v, **lengths) -> torch.Tensor:
    """flash-attn-4's attention, its output alone (some releases also return the log-sum-exp)."""
    from flash_attn.cute.interface import flash_attn_varlen_func

    out = flash_attn_varlen_func(q, k, v, **lengths)
    return out[0] if isinstance(out, tuple) else out


@torch.library.custom_op("f5_triton::fa4_varlen_attention", mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_length: int) -> torch.Tensor:
    """Attention within each sequence of a packed batch: q, k, v and the result [tokens, heads, dim];
    cu_seqlens int32 [sequences + 1]; max_length an upper bound of the sequences' lengths."""
    return _flash_attention(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_length,
                            max_seqlen_k=max_length)


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_length):
    return torch.empty_like(q)


@torch.library.custom_op("f5_triton::fa4_padded_attention", mutates_args=())
def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lengths: torch.Tensor) -> torch.Tensor:
    """Attention over a padded batch: q, k, v and the result [batch, frames, heads, dim]; row i attends to its first
    `key_lengths[i]` keys (int32 [batch]: a padding mask of valid frames first). Every query gets an output, padded
    ones too (finite: they attend to the valid keys), so nothing undefined reaches the rest of the step."""
    return _flash_attention(q, k, v, seqused_k=key_lengths)


@padded_attention.register_fake
def _(q, k, v, key_lengths):
    return torch.empty_like(q)


def works(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> bool:
    """Whether both ops run here (installed; a GPU FA4 supports; fp16/bf16) and match SDPA."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not available():
        return False
    try:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        q, k, v = (torch.randn(96, 2, head_dim, device=device, dtype=dtype) for _ in range(3))
        cu = torch.tensor([0, 64, 96], device=device, dtype=torch.int32)
        out = varlen_attention(q, k, v, cu, 128)
        first = sdpa(*(t[:64].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        padded = padded_attention(*(t.view(2, 48, 2, head_dim) for t in (q, k, v)),
                                  torch.tensor([48, 20], device=device, dtype=torch.int32))
        short = sdpa(*(t[48:68].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
        head = sdpa(q[48:].transpose(0, 1), k[48:68].transpose(0, 1), v[48:68].transpose(0, 1)).transpose(0, 1)
        errors = [(out[:64] - first), (padded[1, :20] - short), (padded[1] - head)]
        return all(float(e.float().abs().max()) < 1e-2 for e in errors)
    except Exception:  # an unsupported GPU, or a kernel that fails to build here
        return False
