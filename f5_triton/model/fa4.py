"""FlashAttention-4's variable-length attention (the `flash-attn-4` package, `flash_attn.cute`) as a torch op.

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


@torch.library.custom_op("f5_triton::fa4_varlen_attention", mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_length: int) -> torch.Tensor:
    """Attention within each sequence of a packed batch: q, k, v and the result [tokens, heads, dim];
    cu_seqlens int32 [sequences + 1]; max_length an upper bound of the sequences' lengths."""
    from flash_attn.cute.interface import flash_attn_varlen_func

    out = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
                                 max_seqlen_q=max_length, max_seqlen_k=max_length)
    return out[0] if isinstance(out, tuple) else out


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_length):
    return torch.empty_like(q)


def works(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> bool:
    """Whether the op runs here (installed; a Hopper or Blackwell GPU; fp16/bf16) and matches plain attention."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16) or not available():
        return False
    try:
        q, k, v = (torch.randn(96, 2, head_dim, device=device, dtype=dtype) for _ in range(3))
        cu = torch.tensor([0, 64, 96], device=device, dtype=torch.int32)
        out = varlen_attention(q, k, v, cu, 128)
        first = torch.nn.functional.scaled_dot_product_attention(*(t[:64].transpose(0, 1) for t in (q, k, v)))
        return bool((out[:64].float() - first.transpose(0, 1).float()).abs().max() < 1e-2)
    except Exception:  # an unsupported GPU, or a kernel that fails to build here
        return False
