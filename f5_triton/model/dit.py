"""The F5-TTS DiT backbone in plain torch.

The state dict has upstream F5-TTS's names and layout (`f5_tts.model.backbones.dit.DiT`), so the
official weights load with `strict=True` and saved weights are upstream's. Things that differ from
upstream, on purpose:

* The text embedding is a separate call (`embed_text`) so a sampler runs it once per request and
  only `step` runs at every ODE step (upstream caches it in thread-local state instead).
* Padding never leaks into a request: attention masks padded keys, and every sequence-wide
  operation (convolutions, the ConvNeXt GRN norm) sees zeros at padded positions. A request's
  output is therefore the same alone or in any batch, and equal to upstream's unbatched output.
* `step` also takes a packed batch (`f5_triton.model.packing`): sequences end to end, no padding at
  all, attention per sequence through a variable-length kernel.
* Each attention's q/k/v projections are one fused [3 * inner, dim] weight, split into upstream's
  `to_q`/`to_k`/`to_v` only in the state dict.
* The kernels are chosen once, for a device and dtype, by `DiT.optimize_for` (`Kernels`); a model
  that was not optimized runs the plain torch path, anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from f5_triton.config import DiTConfig
from f5_triton.model import fa4
from f5_triton.model.packing import Packing


def lens_to_mask(lens: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """[b, length] bool, True where a position is inside its item's length (`length`: the longest by default)."""
    length = int(lens.max()) if length is None else length
    return torch.arange(length, device=lens.device)[None, :] < lens[:, None]


def sinusoidal_embedding(time: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    half_dim = dim // 2
    exponent = math.log(10000) / (half_dim - 1)
    freqs = torch.exp(torch.arange(half_dim, device=time.device).float() * -exponent)
    args = scale * time.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((args.sin(), args.cos()), dim=-1)


def precompute_text_positions(dim: int, length: int, theta: float = 10000.0) -> torch.Tensor:
    """Sinusoidal positions added to the text embedding ([cos | sin] halves, as upstream)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
    angles = torch.outer(torch.arange(length).float(), freqs)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


# Sizes fixed by upstream's architecture (not in DiTConfig; benchmarks/bench.py's cost model reads them here)
TIME_FREQ_DIM = 256  # sinusoidal features of the time step, before its MLP
POSITION_CONV_KERNEL = 31  # the convolutional position embedding's kernel and groups
POSITION_CONV_GROUPS = 16


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, freq_embed_dim: int = TIME_FREQ_DIM):
        super().__init__()
        self.freq_embed_dim = freq_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        hidden = sinusoidal_embedding(time, self.freq_embed_dim).to(time.dtype)
        return self.time_mlp(hidden)


class GRN(nn.Module):
    """Global response normalisation (ConvNeXt-V2); the norm runs over the sequence axis."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.norm(x, p=2, dim=1, keepdim=True)
        scaled = norm / (norm.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * scaled) + self.beta + x


def depthwise_conv1d(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """`conv` (depthwise, stride 1, 'same' zero padding) on channels-last x [b, n, c]: k shifted multiply-adds,
    accumulated in fp32. Written out because cuDNN builds a plan for every new (batch, length) of an fp16
    depthwise convolution, which each request of a new length would wait for (docs/benchmarks.md)."""
    k, pad, n = conv.kernel_size[0], conv.padding[0], x.shape[1]
    padded = F.pad(x.float(), (0, 0, pad, pad))
    weight = conv.weight.float()[:, 0, :]  # [c, k]
    out = padded[:, :n] * weight[:, 0] + conv.bias.float()
    for j in range(1, k):
        out.addcmul_(padded[:, j:j + n], weight[:, j])
    return out.to(x.dtype)


class ConvNeXtV2Block(nn.Module):
    def __init__(self, dim: int, intermediate_dim: int):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.grn = GRN(intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        residual = x
        x = depthwise_conv1d(x, self.dwconv)
        x = self.act(self.pwconv1(self.norm(x)))
        x = x * valid  # GRN's norm spans the sequence: padded rows must not count
        x = self.pwconv2(self.grn(x))
        return residual + x


class TextEmbedding(nn.Module):
    def __init__(self, text_num_embeds: int, text_dim: int, mask_padding: bool = True, conv_layers: int = 0,
                 conv_mult: int = 2, max_positions: int = 8192):
        super().__init__()
        self.text_embed = nn.Embedding(text_num_embeds + 1, text_dim)  # row 0 is the filler token
        self.mask_padding = mask_padding
        self.conv_layers = conv_layers
        if conv_layers > 0:
            self.register_buffer("freqs_cis", precompute_text_positions(text_dim, max_positions), persistent=False)
            self.text_blocks = nn.ModuleList(ConvNeXtV2Block(text_dim, text_dim * conv_mult) for _ in range(conv_layers))

    def forward(self, text: torch.Tensor, seq_lens: torch.Tensor, max_len: int, drop_text: bool = False):
        """text: [b, nt] token ids with -1 as batch padding; seq_lens: [b] mel frames of each request."""
        text = text[:, :max_len] + 1  # filler/padding -1 -> 0; text longer than the audio is cut
        text = F.pad(text, (0, max_len - text.shape[1]), value=0)
        valid = lens_to_mask(seq_lens.to(text.device), max_len)  # [b, n]
        text = text.masked_fill(~valid, 0)
        keep = (text != 0) if self.mask_padding else valid
        keep = keep.unsqueeze(-1)
        if drop_text:
            text = torch.zeros_like(text)
        hidden = self.text_embed(text) * valid.unsqueeze(-1)
        if self.conv_layers > 0:
            hidden = hidden + self.freqs_cis[:max_len].to(hidden.dtype) * valid.unsqueeze(-1)
            hidden = hidden * keep
            for block in self.text_blocks:
                hidden = block(hidden, valid.unsqueeze(-1).to(hidden.dtype)) * keep
        return hidden


class ConvPositionEmbedding(nn.Module):
    def __init__(self, dim: int, kernel_size: int = POSITION_CONV_KERNEL, groups: int = POSITION_CONV_GROUPS):
        super().__init__()
        self.conv1d = nn.Sequential(
            nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=kernel_size // 2),
            nn.Mish(),
            nn.Conv1d(dim, dim, kernel_size, groups=groups, padding=kernel_size // 2),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """x: [b, n, d]; keep: [b, n, 1] float (1 valid, 0 padded) or None."""
        if x.is_cuda:
            return self.forward_channels_last(x, keep)
        x = x.transpose(1, 2)
        keep_t = None if keep is None else keep.transpose(1, 2)
        for layer in self.conv1d:
            if keep_t is not None and isinstance(layer, nn.Conv1d):
                x = x * keep_t
            x = layer(x)
        if keep_t is not None:
            x = x * keep_t
        return x.transpose(1, 2)

    def forward_packed(self, x: torch.Tensor, packing: Packing) -> torch.Tensor:
        """x: [tokens, d] packed. The convolutions run on the gapped layout: zeros between sequences."""
        gapped = packing.to_gapped(x).unsqueeze(0)
        keep = packing.gapped_valid.to(x.dtype)[None, :, None]
        return packing.from_gapped(self(gapped, keep)[0])

    def forward_channels_last(self, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """The same function with x [b, n, d] seen as NHWC images [b, d, n, 1] (a view, no copy): cuDNN then runs
        the grouped convolution as one implicit GEMM, without the layout transposes and per-group kernels of a Conv1d
        on [b, d, n] (the GPU path; docs/benchmarks.md, "Twelfth session")."""
        for layer in self.conv1d:
            if isinstance(layer, nn.Conv1d):
                image = (x if keep is None else x * keep).transpose(1, 2).unsqueeze(3)
                weight = layer.weight.unsqueeze(3).contiguous(memory_format=torch.channels_last)
                x = F.conv2d(image, weight, layer.bias, padding=(layer.padding[0], 0),
                             groups=layer.groups).squeeze(3).transpose(1, 2)
            else:
                x = layer(x)
        return x if keep is None else x * keep


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, text_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(mel_dim * 2 + text_dim, out_dim)
        self.conv_pos_embed = ConvPositionEmbedding(dim=out_dim)

    def forward(self, x, cond, text_embed, keep, packing: Packing | None = None):
        """keep: [b, n, 1] float or None; with `packing`, inputs are packed [tokens, c] (keep unused)."""
        x = self.proj(torch.cat((x, cond, text_embed), dim=-1))
        if packing is not None:
            return self.conv_pos_embed.forward_packed(x, packing) + x
        return self.conv_pos_embed(x, keep) + x


class AdaLayerNorm(nn.Module):
    def __init__(self, dim: int, chunks: int = 6):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * chunks)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1) -> (-x1, x0), the layout x-transformers uses."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


ROTARY_TABLE_POSITIONS = 8192  # rotary angles tabulated at load (longer sequences compute theirs per call)


def _exporting() -> bool:
    """Whether an ONNX/torch.export trace is running: exported graphs compute the rotary angles per call, so that they
    hold no table and no bound on the frames (the engines' shape profiles may go past the table). torch.export's flag
    is read as it is: `torch.compiler.is_exporting()` reads True in any torch.compile trace (dynamo folds it), which
    would keep the table out of the compiled step as well."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or getattr(torch.compiler, "_is_exporting_flag", False)


class RotaryEmbedding(nn.Module):
    """x-transformers' RotaryEmbedding (no xpos), written out so the graph exports to ONNX cleanly."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)  # persistent: the official checkpoints hold it
        self.table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin of positions 0..n-1: `tabulate`

    def tabulate(self, positions: int) -> None:
        """Compute cos and sin of positions 0..`positions`-1 once (`DiT.optimize_for`, on the model's device).
        Otherwise torch.compile fuses their computation into each layer's q/k kernel, evaluating sin and cos for
        every element of q and k in every layer. The same fp32 arithmetic, so the same values."""
        self.table = self._angles(torch.arange(positions, device=self.inv_freq.device).float())

    def _apply(self, fn, *args, **kwargs):
        """Moves and casts (`.to`, `.half`, ...) make the table again from the moved `inv_freq`: it stays fp32, on
        the module's device, and equal to what a call computes without it."""
        super()._apply(fn, *args, **kwargs)
        if self.table is not None:
            self.tabulate(self.table[0].shape[0])
        return self

    def _angles(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = torch.outer(t, self.inv_freq.float()).repeat_interleave(2, dim=-1)
        return freqs.cos(), freqs.sin()

    def forward(self, seq_len: int, device, positions: torch.Tensor | None = None, bound: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [seq_len, dim] of positions 0..seq_len-1, or of `positions` [tokens] (a packed batch, each
        position below `bound`)."""
        length = seq_len if positions is None else bound
        if self.table is not None and 0 < length <= self.table[0].shape[0] and not _exporting():
            return tuple(t[:seq_len] if positions is None else t[positions] for t in self.table)
        return self._angles(torch.arange(seq_len, device=device).float() if positions is None else positions.float())


def cudnn_masked_attention_works(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> bool:
    """Whether cuDNN's fused attention takes an additive key mask here (cuDNN 9 on Ampere/Hopper, fp16/bf16)."""
    try:
        q = torch.randn(1, 1, 64, head_dim, device=device, dtype=dtype)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            F.scaled_dot_product_attention(q, q, q, attn_mask=torch.zeros(1, 1, 1, 64, device=device, dtype=dtype))
        return True
    except RuntimeError:
        return False


PADDED_ATTENTION_KERNELS = ("sdpa", "cudnn", "fa4")
PACKED_ATTENTION_KERNELS = ("per_sequence", "varlen", "fa4")


def varlen_attention_works(device: torch.device, dtype: torch.dtype, head_dim: int = 64) -> bool:
    """Whether torch's variable-length (flash) attention runs here: CUDA, fp16/bf16, torch >= 2.10."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn

        q = torch.randn(96, 1, head_dim, device=device, dtype=dtype)
        cu = torch.tensor([0, 64, 96], device=device, dtype=torch.int32)
        varlen_attn(q, q, q, cu, cu, 64, 64)
        return True
    except (ImportError, RuntimeError):
        return False


def packed_attention(q, k, v, packing: Packing, kernel: str = "per_sequence") -> torch.Tensor:
    """Attention within each sequence of a packed batch; q, k, v and the result are [tokens, heads, dim].

    "varlen": torch's variable-length flash kernel (CUDA, half precision). "fa4": FlashAttention-4's
    (`f5_triton.model.fa4`: Hopper/Blackwell, where flash-attn-4 is installed). "per_sequence": SDPA on each
    sequence in turn (any device; the exact reference). While tracing (ONNX export) a block-diagonal
    mask over all tokens stands in for the loop, whose lengths would be frozen into the graph.
    """
    if kernel == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_length, packing.max_length)
    if kernel == "fa4":
        return fa4.varlen_attention(q, k, v, packing.cu_seqlens, packing.max_length)
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        same = packing.sequence_ids[:, None] == packing.sequence_ids[None, :]
        out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), attn_mask=same)
        return out[0].transpose(0, 1)
    outs, start = [], 0
    for length in packing.lengths:
        window = slice(start, start + length)
        outs.append(F.scaled_dot_product_attention(*(t[window].transpose(0, 1) for t in (q, k, v))).transpose(0, 1))
        start += length
    return torch.cat(outs)


@dataclass(frozen=True)
class Kernels:
    """The DiT's fast paths, chosen together for one device and dtype (`DiT.optimize_for`). The defaults are the
    plain torch path: it runs anywhere, and the tests hold the others to it.

    padded: attention over a padded batch (`PADDED_ATTENTION_KERNELS`): "sdpa" (boolean key mask, torch picks the
        kernel), "cudnn" (cuDNN's fused attention with an additive key mask: several times faster than the
        memory-efficient kernel SDPA picks for a masked call on Hopper, `scripts/attention_bench.py`) or "fa4"
        (FlashAttention-4 with each row's number of valid keys; a padded batch's mask holds valid frames first).
    packed: attention over a packed batch (`PACKED_ATTENTION_KERNELS`): "per_sequence" (SDPA on each sequence),
        "varlen" (torch's variable-length flash kernel) or "fa4" (FlashAttention-4's, where flash-attn-4 is installed
        and runs: 1.4-1.6x faster than "varlen" on Hopper).
    gelu_epilogue: the feed-forward's bias + tanh-GELU in its first GEMM's epilogue (cuBLASLt), saving a pass over
        the widest activation. CUDA only: elsewhere that op's GELU is the exact one, not upstream's tanh.
    """

    padded: str = "sdpa"
    packed: str = "per_sequence"
    gelu_epilogue: bool = False

    def __post_init__(self) -> None:
        if self.padded not in PADDED_ATTENTION_KERNELS or self.packed not in PACKED_ATTENTION_KERNELS:
            raise ValueError(f"attention kernels must be in {PADDED_ATTENTION_KERNELS} (padded) and "
                             f"{PACKED_ATTENTION_KERNELS} (packed), got {self.padded!r}, {self.packed!r}")

    @classmethod
    def for_device(cls, device: torch.device | str, dtype: torch.dtype, head_dim: int = 64) -> "Kernels":
        """The fastest kernels that run on `device` in `dtype` (probed): cuDNN and variable-length attention
        (FlashAttention-4's, else torch's) where they work (CUDA, half precision), the GEMM epilogue on any CUDA
        device; the plain path elsewhere."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls()
        if fa4.works(device, dtype, head_dim):
            return cls(padded="fa4", packed="fa4", gelu_epilogue=True)
        return cls(padded="cudnn" if cudnn_masked_attention_works(device, dtype, head_dim) else "sdpa",
                   packed="varlen" if varlen_attention_works(device, dtype, head_dim) else "per_sequence",
                   gelu_epilogue=True)


class Attention(nn.Module):
    """Upstream's attention with its q/k/v projections fused into one [3 * inner, dim] weight (one GEMM instead of
    three). The state dict keeps upstream's `to_q`, `to_k`, `to_v`: they are split on saving and fused on loading."""

    PROJECTIONS = ("to_q", "to_k", "to_v")

    def __init__(self, dim: int, heads: int, dim_head: int, qk_norm: str | None, pe_attn_head: int | None):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.pe_attn_head = pe_attn_head
        inner = heads * dim_head
        projections = [nn.Linear(dim, inner) for _ in self.PROJECTIONS]  # initialised as three layers, as before fusing
        self.qkv_weight = nn.Parameter(torch.cat([p.weight.detach() for p in projections]))
        self.qkv_bias = nn.Parameter(torch.cat([p.bias.detach() for p in projections]))
        if qk_norm is None:
            self.q_norm = self.k_norm = None
        elif qk_norm == "rms_norm":
            self.q_norm, self.k_norm = RMSNorm(dim_head), RMSNorm(dim_head)
        else:
            raise ValueError(f"qk_norm must be None or 'rms_norm', got {qk_norm!r}")
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """Upstream's layout: the fused weight as to_q, to_k, to_v (copies, so that checkpoint writers, which
        refuse tensors sharing memory, take them). With `keep_vars` (the live parameters, as tracers and
        exporters ask for them) the fused parameters themselves."""
        if keep_vars:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, weight, bias in zip(self.PROJECTIONS, self.qkv_weight.chunk(3), self.qkv_bias.chunk(3)):
            for kind, value in (("weight", weight), ("bias", bias)):
                destination[f"{prefix}{name}.{kind}"] = value.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Fuse upstream's to_q, to_k, to_v as they load (a state dict without them is left to the strict check)."""
        for kind in ("weight", "bias"):
            keys = [f"{prefix}{name}.{kind}" for name in self.PROJECTIONS]
            if all(key in state_dict for key in keys):
                state_dict[f"{prefix}qkv_{kind}"] = torch.cat([state_dict.pop(key) for key in keys])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """t: [..., n, heads, dim_head]; cos, sin: [n, 1, dim_head]."""
        rotated = t * cos + rotate_half(t) * sin
        if self.pe_attn_head is None:
            return rotated.to(t.dtype)
        n = self.pe_attn_head
        return torch.cat((rotated[..., :n, :], t[..., n:, :]), dim=-2).to(t.dtype)

    def _qkv(self, x, rope):
        """Normed, rotated q, k, v of x [..., n, dim], each [..., n, heads, dim_head]."""
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.dim_head)).unbind(-3)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (r.unsqueeze(-2) for r in rope)  # broadcast over heads
        return self._rope(q, cos, sin), self._rope(k, cos, sin), v

    def forward_packed(self, x, rope, packing: Packing, kernel: str = "per_sequence"):
        """x: [tokens, dim] packed; rope: cos, sin [tokens, dim_head] at each token's own position;
        kernel: `Kernels.packed`."""
        q, k, v = self._qkv(x, rope)
        out = packed_attention(q, k, v, packing, kernel)
        return self.to_out[0](out.flatten(1).to(x.dtype))

    def forward(self, x, rope, key_mask, keep, kernel: str = "sdpa"):
        """key_mask: [b, 1, 1, n] bool (True = valid key), or None; with kernel (`Kernels.padded`) "cudnn" an
        additive float mask instead, with "fa4" each row's number of valid keys (int32 [b]). keep: [b, n, 1] float
        or None."""
        b = x.shape[0]
        if kernel == "fa4":
            out = fa4.padded_attention(*self._qkv(x, rope), key_mask).flatten(2)
            out = self.to_out[0](out.to(x.dtype))
            return out if keep is None else out * keep
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x, rope))
        if key_mask is not None and kernel == "cudnn":
            # SDPA's default order would pick the memory-efficient kernel for a masked call (~2x slower)
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head).to(q.dtype)
        out = self.to_out[0](out)
        return out if keep is None else out * keep


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: float):
        super().__init__()
        inner = int(dim * mult)
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
                                nn.Dropout(0.0), nn.Linear(inner, dim))

    def forward(self, x, gelu_epilogue: bool = False):
        """gelu_epilogue: `Kernels.gelu_epilogue` (CUDA only)."""
        if gelu_epilogue:
            up = self.ff[0][0]
            h = torch._addmm_activation(up.bias, x.flatten(0, -2), up.weight.t(), use_gelu=True)
            return self.ff[2](h.unflatten(0, x.shape[:-1]))
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, dim, heads, dim_head, ff_mult, qk_norm, pe_attn_head):
        super().__init__()
        self.attn_norm = AdaLayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, qk_norm, pe_attn_head)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x, t, rope, key_mask, keep, packing: Packing | None = None, kernels: Kernels = Kernels()):
        """With `packing`: x packed [tokens, dim], t [sequences, dim], key_mask and keep unused."""
        mod = self.attn_norm.linear(self.attn_norm.silu(t))
        mod = mod.unsqueeze(1) if packing is None else mod[packing.sequence_ids]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        norm = self.attn_norm.norm(x) * (1 + scale_msa) + shift_msa
        attn = (self.attn(norm, rope, key_mask, keep, kernels.padded) if packing is None
                else self.attn.forward_packed(norm, rope, packing, kernels.packed))
        x = x + gate_msa * attn
        norm = self.ff_norm(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(norm, kernels.gelu_epilogue)


class DiT(nn.Module):
    """F5-TTS DiT. Constructor keywords are upstream's; training-only ones are accepted and ignored."""

    def __init__(
        self,
        *,
        dim: int,
        depth: int = 8,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.1,
        ff_mult: float = 4,
        mel_dim: int = 100,
        text_num_embeds: int = 256,
        text_dim: int | None = None,
        text_mask_padding: bool = True,
        text_embedding_average_upsampling: bool = False,
        qk_norm: str | None = None,
        conv_layers: int = 0,
        pe_attn_head: int | None = None,
        attn_backend: str = "torch",
        attn_mask_enabled: bool = False,
        long_skip_connection: bool = False,
        checkpoint_activations: bool = False,
    ):
        super().__init__()
        if text_embedding_average_upsampling:
            raise NotImplementedError("text_embedding_average_upsampling is not used by any released F5-TTS model")
        text_dim = mel_dim if text_dim is None else text_dim
        self.config = DiTConfig(dim=dim, depth=depth, heads=heads, dim_head=dim_head, ff_mult=ff_mult,
                                mel_dim=mel_dim, text_num_embeds=text_num_embeds, text_dim=text_dim,
                                text_mask_padding=text_mask_padding, qk_norm=qk_norm, conv_layers=conv_layers,
                                pe_attn_head=pe_attn_head)
        self.dim, self.depth, self.mel_dim = dim, depth, mel_dim
        self.time_embed = TimestepEmbedding(dim)
        self.text_embed = TextEmbedding(text_num_embeds, text_dim, mask_padding=text_mask_padding,
                                        conv_layers=conv_layers)
        self.input_embed = InputEmbedding(mel_dim, text_dim, dim)
        self.rotary_embed = RotaryEmbedding(dim_head)
        self.transformer_blocks = nn.ModuleList(
            DiTBlock(dim, heads, dim_head, ff_mult, qk_norm, pe_attn_head) for _ in range(depth))
        self.long_skip_connection = nn.Linear(dim * 2, dim, bias=False) if long_skip_connection else None
        self.norm_out = AdaLayerNorm(dim, chunks=2)
        self.proj_out = nn.Linear(dim, mel_dim)
        self.kernels = Kernels()  # the plain path until `optimize_for` chooses the device's

    # What the sampler asks of the model it runs (`sampler.StepModel`), answered for this eager module: no solver
    # of its own (the sampler loops its Euler steps over `step`), every batch packed, no CUDA graphs to prepare.
    solver = None

    def packs(self, sequences: int) -> bool:
        """Whether a step over `sequences` sequences should run packed (the sampler asks): always."""
        return True

    def cover_shapes(self, max_requests: int, max_frames: int, nfe_steps: int, log=None) -> int:
        """The shapes prepared ahead of a server's requests (`FlowMatcher.warm_up`): none, eager needs none."""
        return 0

    @classmethod
    def from_config(cls, config: DiTConfig) -> "DiT":
        return cls(**{k: getattr(config, k) for k in config.__dataclass_fields__})

    def optimize_for(self, device: torch.device | str, dtype: torch.dtype) -> "DiT":
        """The model on `device` in `dtype`, in eval mode, running the fastest kernels that work there
        (`Kernels.for_device`, probed): everything about how it runs, chosen in this one call, after the weights
        are loaded. Move it no further: kernels chosen for a GPU need not run elsewhere."""
        self.to(device=device, dtype=dtype).eval()
        self.kernels = Kernels.for_device(device, dtype, self.config.dim_head)
        self.rotary_embed.tabulate(ROTARY_TABLE_POSITIONS)
        return self

    def embed_text(self, text: torch.Tensor, seq_lens: torch.Tensor, max_len: int, drop_text: bool = False):
        """Text embedding for `max_len` frames; runs once per request, not once per ODE step."""
        return self.text_embed(text, seq_lens, max_len, drop_text=drop_text)

    def step(self, x, cond, text_embed, time, mask=None):
        """The per-step network: flow prediction for noisy mel `x` given prepared conditions.

        x, cond: [b, n, mel_dim]; text_embed: [b, n, text_dim]; time: [b] or scalar;
        mask: [b, n] bool (True = valid frame; each row's valid frames first, as `lens_to_mask` makes them) or None
        when no request is padded.
        A packed batch instead: x, cond, text_embed [tokens, c], time [sequences] or scalar, mask a `Packing`.
        """
        if isinstance(mask, Packing):
            return self._packed_step(x, cond, text_embed, time, mask)
        b, n = x.shape[0], x.shape[1]
        if time.ndim == 0:
            time = time.repeat(b)
        t = self.time_embed(time)
        keep = None if mask is None else mask.unsqueeze(-1).to(x.dtype)
        key_mask = self._key_mask(mask, b, n, x)
        h = self.input_embed(x, cond, text_embed, keep)
        rope = self.rotary_embed(n, x.device)
        residual = h
        for block in self.transformer_blocks:
            h = block(h, t, rope, key_mask, keep, kernels=self.kernels)
        if self.long_skip_connection is not None:
            h = self.long_skip_connection(torch.cat((h, residual), dim=-1))
        scale, shift = self.norm_out.linear(self.norm_out.silu(t)).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm_out.norm(h) * (1 + scale) + shift
        return self.proj_out(h)

    def _key_mask(self, mask, b: int, n: int, x: torch.Tensor):
        """The padding mask as `Kernels.padded` takes it: "sdpa" boolean [b, 1, 1, n], "cudnn" additive float, both None
        without padding; "fa4" each row's number of valid keys, int32 [b] (valid frames come first in every row)."""
        if self.kernels.padded == "fa4":
            return (torch.full((b,), n, device=x.device) if mask is None else mask.sum(dim=1)).to(torch.int32)
        if mask is None:
            return None
        key_mask = mask[:, None, None, :]
        if self.kernels.padded == "cudnn":
            return torch.zeros(key_mask.shape, dtype=x.dtype, device=x.device).masked_fill(~key_mask, float("-inf"))
        return key_mask

    def _packed_step(self, x, cond, text_embed, time, packing: Packing):
        if time.ndim == 0:
            time = time.repeat(packing.sequences)
        t = self.time_embed(time)
        h = self.input_embed(x, cond, text_embed, None, packing)
        rope = self.rotary_embed(0, x.device, positions=packing.positions, bound=packing.max_length)
        residual = h
        for block in self.transformer_blocks:
            h = block(h, t, rope, None, None, packing, self.kernels)
        if self.long_skip_connection is not None:
            h = self.long_skip_connection(torch.cat((h, residual), dim=-1))
        scale, shift = self.norm_out.linear(self.norm_out.silu(t))[packing.sequence_ids].chunk(2, dim=-1)
        h = self.norm_out.norm(h) * (1 + scale) + shift
        return self.proj_out(h)

    def forward(self, x, cond, text, time, mask=None, drop_audio_cond: bool = False, drop_text: bool = False):
        """Upstream's signature: one network evaluation, text embedding included."""
        b, n = x.shape[0], x.shape[1]
        seq_lens = mask.sum(dim=1) if mask is not None else torch.full((b,), n, device=x.device)
        text_embed = self.embed_text(text, seq_lens, n, drop_text=drop_text)
        if drop_audio_cond:
            cond = torch.zeros_like(cond)
        return self.step(x, cond, text_embed, time, mask)
