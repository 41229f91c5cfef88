"""The networks that engines run, as torch modules with the signatures in `base.NETWORKS`.

`DiTStep` is the DiT's per-ODE-step network (the text embedding stays outside it, in torch);
`VocoderNetwork` is the exportable Vocos decoder. The torch engine runs these modules, the ONNX
exporter traces them, and `random_inputs` makes padded test inputs for any of them.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from f5_triton.engines.base import DIT_STEP, VOCODER, NetworkSpec
from f5_triton.model import DiT
from f5_triton.model.dit import lens_to_mask


class DiTStep(nn.Module):
    """`DiT.step` as a module: (x, cond, text_embed, time, mask) -> flow."""

    spec = DIT_STEP

    def __init__(self, model: DiT):
        super().__init__()
        self.model = model

    @property
    def static_sizes(self) -> dict[str, int]:
        return {"mel": self.model.mel_dim, "text": self.model.config.text_dim}

    @property
    def packing_is_data(self) -> bool:
        """Whether a packed step reads its layout from the packing's tensors alone (its attention kernel is a
        variable-length one, not the host loop over `lengths`): then one CUDA graph replays any layout of its shape."""
        return self.model.kernels.packed != "per_sequence"

    def forward(self, x, cond, text_embed, time, mask):
        return self.model.step(x, cond, text_embed, time, mask)


class VocoderNetwork(nn.Module):
    """`VocosDecoder` with the vocoder's signature: (mel [b, 100, frames], lengths [b]) -> waveform."""

    spec = VOCODER

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    @property
    def static_sizes(self) -> dict[str, int]:
        return {"mel": self.decoder.backbone.input_channels}

    def forward(self, mel, lengths):
        return self.decoder(mel, lengths)


def as_network(module: nn.Module) -> nn.Module:
    """`module` itself if it has a `spec`, else its network wrapper (DiT -> DiTStep, VocosDecoder -> VocoderNetwork)."""
    if isinstance(getattr(module, "spec", None), NetworkSpec):
        return module
    if isinstance(module, DiT):
        return DiTStep(module)
    from f5_triton.vocoder import VocosDecoder

    if isinstance(module, VocosDecoder):
        return VocoderNetwork(module)
    raise TypeError(f"no network spec for {type(module).__name__}: pass a DiT, a VocosDecoder or a module with .spec")


def random_inputs(spec: NetworkSpec, lengths: Sequence[int], static_sizes: dict[str, int],
                  seed: int = 0) -> list[torch.Tensor]:
    """Inputs of a padded batch, one item per entry of `lengths`, shaped as a real call would be.

    Float tensors with a frames axis are standard normal inside each item's length and zero past
    it (as the sampler pads), masks and lengths follow `lengths`, per-item floats (time) are in [0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(list(lengths), dtype=torch.int64)
    batch, frames = len(lengths), int(max(lengths))
    sizes = {"batch": batch, "frames": frames, **static_sizes}
    valid = lens_to_mask(lengths_t, frames)
    tensors = []
    for tensor_spec in spec.inputs:
        shape = [sizes[axis] for axis in tensor_spec.axes]
        frames_axis = tensor_spec.axis("frames")
        if tensor_spec.dtype == torch.bool:
            tensor = valid
        elif not tensor_spec.dtype.is_floating_point:
            tensor = lengths_t.to(tensor_spec.dtype)
        elif frames_axis is None:
            tensor = torch.rand(shape, generator=generator)
        else:
            keep = valid.view(batch, *[frames if i == frames_axis else 1 for i in range(1, len(shape))])
            tensor = torch.randn(shape, generator=generator) * keep
        tensors.append(tensor)
    return tensors


def output_valid_mask(spec: NetworkSpec, output: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Bool mask broadcastable to `output`: True where the output belongs to an item's valid frames.

    Outputs at padded frames are unused (and undefined for the DiT), so comparisons skip them.
    """
    lengths_t = torch.tensor(list(lengths), dtype=torch.int64)
    out_spec = spec.outputs[0]
    for name, length in (("frames", lengths_t), ("samples", spec.samples(lengths_t))):
        axis = out_spec.axis(name)
        if axis is not None:
            keep = lens_to_mask(length, output.shape[axis])
            return keep.view(output.shape[0], *[output.shape[axis] if i == axis else 1
                                                for i in range(1, output.ndim)])
    return torch.ones((1,) * output.ndim, dtype=torch.bool)
