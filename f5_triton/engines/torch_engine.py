"""The torch engine: the network's own module, eager, or on a GPU compiled and/or replayed as CUDA graphs.

CUDA graphs need fixed shapes, so each call's frames are zero-padded up to the next of
`EngineConfig.frame_buckets` and one graph is captured per (batch, bucket). That is exact, not an
approximation: both networks keep padded frames out of valid ones (the DiT through its mask, the
vocoder through its lengths), and the output is cut back to the call's frames. Calls longer than
the largest bucket run without a graph.

A packed DiT batch (`f5_triton.model.packing`: sequences end to end, a `Packing` in place of the
mask) runs the module as it is, compiled or eager, without padding; `packs` tells the sampler which
batches to pack: those the padded CUDA graphs do not cover. Small packed batches, whose steps would
otherwise wait on the host's launches, replay graphs too (`graph_max_tokens`): their tokens are
rounded up to a bucket and their sequences filled up to a fixed count with filler sequences
(`packing.filled`), which no other sequence sees.

For the DiT the engine also offers `solver`: the sampler's whole Euler loop (CFG and updates
included) captured `graph_steps` ODE steps per graph (`solvers.GraphedSolver`, built here over the
engine's compiled step and graph memory pool), so a 16-step request is two replays instead of 16 DiT
calls with their padding, copies and Python in between.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Sequence

import torch
from torch import nn

from f5_triton.engines.base import Engine, EngineConfig, NetworkSpec
from f5_triton.model.packing import Packing
from f5_triton.solvers import CapturedGraph, GraphedSolver, aligned, noting_compiles, on_device

logger = logging.getLogger(__name__)


class TorchEngine(Engine):
    """Runs `module(*inputs)` in torch; inputs are moved to the module's device and float dtype."""

    kind = "torch"
    solver: GraphedSolver | None = None

    def __init__(self, module: nn.Module, spec: NetworkSpec, config: EngineConfig | None = None):
        config = config or EngineConfig()
        self.spec = spec
        self.module = module.eval()
        param = next(module.parameters(), None)
        self.device = param.device if param is not None else torch.device(config.device)
        self.dtype = param.dtype if param is not None else torch.float32
        self._forward: Callable[..., torch.Tensor] = self.module
        self._graphs: _CudaGraphs | None = None
        if (config.compile or config.cuda_graphs) and self.device.type != "cuda":
            logger.info("%s: torch compile / CUDA graphs need a CUDA device; running eager on %s",
                        spec.name, self.device)
            return
        if config.compile:
            self._forward = _lengths_dynamic(torch.compile(self.module), spec)
        if config.cuda_graphs:
            self._graphs = _CudaGraphs(self._forward, spec, config.frame_buckets, config.graph_max_rows)
            if spec.batch_per_request == 2 and config.graph_steps > 0:  # the DiT step
                max_tokens = config.graph_max_tokens if getattr(module, "packing_is_data", False) else 0
                self.solver = GraphedSolver(self._forward, config.frame_buckets, config.graph_steps,
                                            self._graphs.pool, self._graphs.lock, config.graph_max_rows, max_tokens)

    def cover_shapes(self, max_rows: int, max_frames: int, total_steps: int, mel_dim: int, text_dim: int,
                     log: Callable[[str], None] | None = None) -> int:
        """Capture now every CUDA graph that solves of up to `max_rows` rows and `max_frames` frames with
        `total_steps` guided ODE steps can meet (`GraphedSolver.keys_to_cover`), and the packed ones up to
        `graph_max_tokens`, so none is captured while users wait; larger batches run packed, compiled for any
        token count. Returns the graphs captured."""
        if self.solver is None:
            return 0
        keys = self.solver.keys_to_cover(max_rows, max_frames, total_steps)
        start, memory = time.perf_counter(), _reserved_mib(self.device)
        captured = 0
        for i, key in enumerate(keys, 1):
            captured += self.solver.capture(key, mel_dim, text_dim, self.dtype, self.device)
            if log is not None and (i % 32 == 0 or i == len(keys)):
                log(f"CUDA graphs: {i}/{len(keys)} shapes covered ({captured} captured now), "
                    f"{time.perf_counter() - start:.1f} s, "
                    f"{_reserved_mib(self.device) - memory:.0f} MiB more reserved on the GPU")
        return captured

    def packs(self, sequences: int) -> bool:
        """Whether a DiT step over `sequences` sequences should run packed (the DiT step's module takes a `Packing`
        in place of the mask): unless a CUDA graph covers it."""
        graphs = self.solver or self._graphs
        return self.spec.batch_per_request == 2 and (graphs is None or sequences > graphs.max_rows)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if isinstance(inputs[-1], Packing):
            return self._packed(*inputs)
        self.spec.check(inputs)
        inputs = [t.to(self.device, self.dtype if t.is_floating_point() else t.dtype) for t in inputs]
        with torch.inference_mode(), on_device(self.device), noting_compiles(
                lambda: f"{self.spec.name}: {self.spec.sizes(inputs)}", logger):
            if self._graphs is not None:
                return self._graphs(inputs)
            return self._forward(*inputs)


    def _packed(self, *inputs) -> torch.Tensor:
        *tensors, packing = inputs
        tensors = [t.to(self.device, self.dtype if t.is_floating_point() else t.dtype) for t in tensors]
        with torch.inference_mode(), on_device(self.device), noting_compiles(
                lambda: f"{self.spec.name}: packed, {packing.sequences} sequences, {packing.tokens} tokens", logger):
            return self._forward(*tensors, packing)


def _lengths_dynamic(compiled: Callable[..., torch.Tensor], spec: NetworkSpec) -> Callable[..., torch.Tensor]:
    """`compiled` with the lengths of every call marked dynamic: the frames axis of a padded call, the token and
    sequence axes of a packed one. Otherwise torch.compile specializes its first graph of each kind on the warm-up
    call's lengths, and the first request of another length compiles again while users wait (tens of seconds)."""
    from torch._dynamo import maybe_mark_dynamic

    axes = [tensor.axis("frames") for tensor in spec.inputs]

    def forward(*inputs):
        if isinstance(inputs[-1], Packing):
            packing = inputs[-1]
            for tensor in (*inputs[:-1], packing.cu_seqlens, packing.sequence_ids, packing.positions,
                           packing.gapped_index, packing.gapped_valid):
                if tensor.ndim:
                    maybe_mark_dynamic(tensor, 0)
        else:
            for tensor, axis in zip(inputs, axes):
                if axis is not None and torch.is_tensor(tensor):
                    maybe_mark_dynamic(tensor, axis)
        return compiled(*inputs)

    return forward


def _reserved_mib(device: torch.device) -> float:
    return torch.cuda.memory_reserved(device) / 2**20 if device.type == "cuda" else 0.0


class _CudaGraphs:
    """Per-(batch, frames bucket) CUDA graphs of one network; calls pad frames to their bucket.

    Batches above `max_rows`, and frames past the largest bucket, run without a graph (padded to a multiple
    of `solvers.FRAME_ALIGNMENT` frames)."""

    def __init__(self, forward: Callable[..., torch.Tensor], spec: NetworkSpec, buckets: Sequence[int],
                 max_rows: int = 8):
        self.forward = forward
        self.spec = spec
        self.buckets = tuple(sorted(buckets))
        self.max_rows = max_rows
        self.graphs: dict[tuple[int, int], CapturedGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time, so they share memory
        self.lock = threading.Lock()  # static buffers are shared state

    def __call__(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        sizes = self.spec.sizes(inputs)
        frames = sizes["frames"]
        bucket = next((b for b in self.buckets if b >= frames), None)
        if sizes["batch"] > self.max_rows or bucket is None:
            if bucket is None:
                logger.debug("%s: %d frames exceed the largest CUDA graph bucket %d; running without a graph",
                             self.spec.name, frames, self.buckets[-1] if self.buckets else 0)
            return self.spec.trim_frames(self.forward(*self.spec.pad_frames(inputs, aligned(frames))), frames)
        padded = self.spec.pad_frames(inputs, bucket)
        key = (sizes["batch"], bucket)
        with self.lock:
            graph = self.graphs.get(key)
            if graph is None:
                logger.info("%s: capturing a CUDA graph for batch %d, %d frames", self.spec.name, *key)
                graph = self.graphs[key] = CapturedGraph(self.forward, padded, self.pool)
            output = graph.replay(padded)
            # the static output is overwritten by the next replay: hand out a copy
            return self.spec.trim_frames(output, frames).clone()
