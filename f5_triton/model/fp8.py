"""FP8 (e4m3) matrix multiplies for the DiT's transformer linears: an opt-in speed/precision trade.

Weights are quantized once, one scale per output channel; activations at run time, one scale per row
(token), so an outlier token does not flatten the others. On CUDA the product runs on FP8 tensor cores
through `torch._scaled_mm` (Hopper, Ada), which takes exactly these row/column scales; elsewhere it is
emulated in fp32 with the same quantized values, so CPU tests see the numerics a GPU produces.

Not exact: the audio's error against the fp32 model is what `scripts/bench_vs_upstream.py --variants
...+fp8` reports next to the fp16 one.
"""

from __future__ import annotations

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [rows, k] -> (fp8 [rows, k], float32 scales [rows, 1]) with t ≈ q * scale (zero rows stay zero)."""
    scale = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).to(FP8), scale


class Fp8Linear(nn.Module):
    """`nn.Linear` with FP8 weights and per-row FP8 activations; output in the input's dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight_fp8, weight_scale = quantize_rows(weight.detach())  # rows of W = output channels
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.t().contiguous())  # [1, out], as _scaled_mm wants
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Fp8Linear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        x_fp8, x_scale = quantize_rows(rows)
        if x.is_cuda:  # mat2 must be column-major: W [out, k] transposed is
            y = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                                 out_dtype=torch.bfloat16)  # row-wise scales need a bf16 output
        else:
            y = (x_fp8.float() * x_scale) @ (self.weight_fp8.float() * self.weight_scale.t()).t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) or 9.x (Hopper) and later; the CPU emulates."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)
