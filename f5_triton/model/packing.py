"""Packed batches: a batch's sequences laid end to end, [tokens, channels], with no padding.

A DiT step over a padded batch [b, n, c] spends its GEMMs, norms and feed-forward on padded frames
as well; on mixed-length traffic a quarter of the rows and almost half the attention work belong to
no request. `Packing` describes where each sequence lies in the packed tensor (built once per
sampler call, not per ODE step), and `DiT.step` takes it in place of the padding mask:

* attention runs per sequence (`cu_seqlens` for a variable-length kernel, `lengths` for a loop);
* rotary positions restart at every sequence (`positions`), time modulation is per sequence
  (`sequence_ids` picks each token's row);
* the convolutional position embedding runs on a "gapped" layout with `CONV_GAP` zero tokens
  between sequences (`gapped_index`), so a convolution never mixes neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# Zero tokens between sequences in the convolution's layout: half the position embedding's kernel (31)
CONV_GAP = 15


# The bound of the longest sequence that variable-length kernels get for every batch within the default frame limit
VARLEN_BOUND = 4096


def _bucket_length(length: int) -> int:
    """An upper bound of the longest sequence for variable-length kernels, which take it as a plain int. A
    compiled step specializes on it (a recompile while users wait), so it is the same for every batch within
    the default frame limit: VARLEN_BOUND, else the next power of two. The kernels skip the blocks past a
    sequence's end, so a loose bound costs little."""
    return max(VARLEN_BOUND, 1 << (max(length, 1) - 1).bit_length())


@dataclass(frozen=True, eq=False)
class Packing:
    """Where each of a packed batch's sequences lies; see the module docstring."""

    lengths: tuple[int, ...]  # tokens of each sequence, in packed order
    cu_seqlens: torch.Tensor  # int32 [sequences + 1]: start of each sequence, then the total
    sequence_ids: torch.Tensor  # int64 [tokens]: the sequence each token belongs to
    positions: torch.Tensor  # int64 [tokens]: the token's position inside its sequence
    gapped_index: torch.Tensor  # int64 [tokens]: the token's place in the convolution's gapped layout
    gapped_valid: torch.Tensor  # bool [gapped tokens]: True at tokens, False in the gaps
    max_length: int  # an upper bound of `lengths` (`_bucket_length`), for variable-length kernels

    @classmethod
    def of(cls, lengths: Sequence[int], device: torch.device | str = "cpu", max_length: int | None = None
           ) -> "Packing":
        """max_length: the bound for variable-length kernels (default `_bucket_length` of the longest)."""
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"a packing needs sequences of at least one token, got lengths {lengths}")
        lengths_t = torch.tensor(lengths, dtype=torch.int64)
        starts = torch.cumsum(lengths_t, 0) - lengths_t
        sequence_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)
        positions = torch.arange(int(lengths_t.sum())) - starts[sequence_ids]
        gapped_index = torch.arange(int(lengths_t.sum())) + CONV_GAP * (sequence_ids + 1)
        gapped_valid = torch.zeros(int(lengths_t.sum()) + CONV_GAP * (len(lengths) + 1), dtype=torch.bool)
        gapped_valid[gapped_index] = True
        cu_seqlens = torch.cat((starts, lengths_t.sum().view(1))).to(torch.int32)
        return cls(lengths, *(t.to(device) for t in (cu_seqlens, sequence_ids, positions, gapped_index,
                                                      gapped_valid)),
                   max_length if max_length is not None else _bucket_length(max(lengths)))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The device tensors, in field order (`with_tensors` takes them back)."""
        return self.cu_seqlens, self.sequence_ids, self.positions, self.gapped_index, self.gapped_valid

    def with_tensors(self, *tensors: torch.Tensor) -> "Packing":
        """The same layout over other tensors of the same shapes (a CUDA graph's static copies)."""
        return Packing(self.lengths, *tensors, self.max_length)

    @property
    def sequences(self) -> int:
        return len(self.lengths)

    @property
    def tokens(self) -> int:
        return self.sequence_ids.shape[0]

    def to_gapped(self, packed: torch.Tensor) -> torch.Tensor:
        """[tokens, c] -> [gapped tokens, c] with zeros in the gaps."""
        gapped = packed.new_zeros(self.gapped_valid.shape[0], packed.shape[-1])
        return gapped.index_copy(0, self.gapped_index, packed)

    def from_gapped(self, gapped: torch.Tensor) -> torch.Tensor:
        return gapped.index_select(0, self.gapped_index)


def filled(lengths: Sequence[int], tokens: int, sequences: int) -> tuple[int, ...]:
    """`lengths` followed by filler sequences of at least one token each: `sequences` sequences of `tokens` tokens
    in all. A packed batch of fixed shape (what a CUDA graph replays) whatever its sequences; every operation is
    per sequence, so fillers change nothing in the others."""
    lengths = tuple(int(n) for n in lengths)
    spare, fill = sequences - len(lengths), tokens - sum(lengths)
    if spare == fill == 0:
        return lengths
    if spare < 1 or fill < spare:
        raise ValueError(f"cannot fill {lengths} to {sequences} sequences of {tokens} tokens")
    return lengths + (fill - spare + 1,) + (1,) * (spare - 1)
