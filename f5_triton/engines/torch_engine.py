"""The torch engine: the network's own module, eager, or on a GPU compiled and/or replayed as CUDA graphs.

CUDA graphs need fixed shapes, so each call's frames are zero-padded up to the next of
`EngineConfig.frame_buckets` and one graph is captured per (batch, bucket). That is exact, not an
approximation: both networks keep padded frames out of valid ones (the DiT through its mask, the
vocoder through its lengths), and the output is cut back to the call's frames. Calls longer than
the largest bucket run without a graph.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

import torch
from torch import nn

from f5_triton.engines.base import EngineConfig, NetworkSpec

logger = logging.getLogger(__name__)


class TorchEngine:
    """Runs `module(*inputs)` in torch; inputs are moved to the module's device and float dtype."""

    kind = "torch"

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
            # dynamic=None: the first new shape recompiles with symbolic sizes, so frames do not recompile forever
            self._forward = torch.compile(self.module)
        if config.cuda_graphs:
            self._graphs = _CudaGraphs(self._forward, spec, config.frame_buckets)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.spec.check(inputs)
        inputs = [t.to(self.device, self.dtype if t.is_floating_point() else t.dtype) for t in inputs]
        with torch.inference_mode():
            if self._graphs is not None:
                return self._graphs(inputs)
            return self._forward(*inputs)


class _CapturedGraph:
    """One CUDA graph of `forward` at fixed input shapes, with its static input and output buffers."""

    def __init__(self, forward: Callable[..., torch.Tensor], example: Sequence[torch.Tensor], pool):
        self.inputs = [t.clone() for t in example]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph: cuBLAS workspaces, autotuning, compilation
            for _ in range(2):
                forward(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = forward(*self.inputs)

    def replay(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        for static, tensor in zip(self.inputs, inputs):
            static.copy_(tensor)
        self.graph.replay()
        return self.output


class _CudaGraphs:
    """Per-(batch, frames bucket) CUDA graphs of one network; calls pad frames to their bucket."""

    def __init__(self, forward: Callable[..., torch.Tensor], spec: NetworkSpec, buckets: Sequence[int]):
        self.forward = forward
        self.spec = spec
        self.buckets = tuple(sorted(buckets))
        self.graphs: dict[tuple[int, int], _CapturedGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # graphs replay one at a time, so they share memory
        self.lock = threading.Lock()  # static buffers are shared state

    def __call__(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        sizes = self.spec.sizes(inputs)
        frames = sizes["frames"]
        bucket = next((b for b in self.buckets if b >= frames), None)
        if bucket is None:
            logger.debug("%s: %d frames exceed the largest CUDA graph bucket %d; running without a graph",
                         self.spec.name, frames, self.buckets[-1] if self.buckets else 0)
            return self.forward(*inputs)
        padded = self.spec.pad_frames(inputs, bucket)
        key = (sizes["batch"], bucket)
        with self.lock:
            graph = self.graphs.get(key)
            if graph is None:
                logger.info("%s: capturing a CUDA graph for batch %d, %d frames", self.spec.name, *key)
                graph = self.graphs[key] = _CapturedGraph(self.forward, padded, self.pool)
            output = graph.replay(padded)
            # the static output is overwritten by the next replay: hand out a copy
            return self.spec.trim_frames(output, frames).clone()
