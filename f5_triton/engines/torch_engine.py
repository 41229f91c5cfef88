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
included) captured `graph_steps` ODE steps per graph, so a 16-step request is two replays instead
of 16 DiT calls with their padding, copies and Python in between.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from f5_triton.engines.base import EngineConfig, NetworkSpec, pad_axis
from f5_triton.model import packing as packing_
from f5_triton.model.packing import Packing
from f5_triton.sampler import euler_solve

logger = logging.getLogger(__name__)


# Calls without a CUDA graph still pad frames to a multiple of this (exact: padding is masked): under
# torch.compile an unaligned attention mask gets padded and materialized. H200, 32-row masked step: 77.7 ms at
# 1361 frames, 63.5 at 1368. Padding to 64 like the graph buckets: 61.8 ms at 1408 compiled statically, yet the
# server (dynamic-shape compile) then gave 136 audio s/s at concurrency 64 instead of 142 (docs/benchmarks.md).
FRAME_ALIGNMENT = 8


def _aligned(frames: int) -> int:
    return -(-frames // FRAME_ALIGNMENT) * FRAME_ALIGNMENT


# Packed graphs: tokens (both guidance branches) rounded up to a multiple of this; each branch holds this many
# sequences, requests and fillers, so a batch of up to PACKED_GRAPH_SEQUENCES - 1 requests fits one graph.
PACKED_TOKEN_BUCKET = 1024
PACKED_GRAPH_SEQUENCES = 16


class TorchEngine:
    """Runs `module(*inputs)` in torch; inputs are moved to the module's device and float dtype."""

    kind = "torch"
    solver: "GraphedSolver | None" = None

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
        with torch.inference_mode(), _on(self.device), _noting_compiles(
                lambda: f"{self.spec.name}: {self.spec.sizes(inputs)}"):
            if self._graphs is not None:
                return self._graphs(inputs)
            return self._forward(*inputs)


    def _packed(self, *inputs) -> torch.Tensor:
        *tensors, packing = inputs
        tensors = [t.to(self.device, self.dtype if t.is_floating_point() else t.dtype) for t in tensors]
        with torch.inference_mode(), _on(self.device), _noting_compiles(
                lambda: f"{self.spec.name}: packed, {packing.sequences} sequences, {packing.tokens} tokens"):
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


def _graphs_compiled() -> int:
    """Graphs torch.compile has built in this process (0 before its first use: no import for eager engines)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def _noting_compiles(describe_call: Callable[[], str]):
    """Log when a call made torch.compile build graphs: expected during warm-up, a stall of seconds under load.
    `describe_call` runs only then (nothing formatted on the hot path)."""
    before, start = _graphs_compiled(), time.perf_counter()
    yield
    built = _graphs_compiled() - before
    if built:
        logger.info("%s: torch.compile built %d graph(s), call took %.1f s", describe_call(), built,
                    time.perf_counter() - start)


def _on(device: torch.device):
    """Make `device` current: streams and graph captures belong to the current device, which is cuda:0
    by default even in a process whose model lives on cuda:1 (a Triton instance on the second GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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
    """Per-(batch, frames bucket) CUDA graphs of one network; calls pad frames to their bucket.

    Batches above `max_rows`, and frames past the largest bucket, run without a graph (padded to a multiple
    of FRAME_ALIGNMENT frames)."""

    def __init__(self, forward: Callable[..., torch.Tensor], spec: NetworkSpec, buckets: Sequence[int],
                 max_rows: int = 8):
        self.forward = forward
        self.spec = spec
        self.buckets = tuple(sorted(buckets))
        self.max_rows = max_rows
        self.graphs: dict[tuple[int, int], _CapturedGraph] = {}
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
            return self.spec.trim_frames(self.forward(*self.spec.pad_frames(inputs, _aligned(frames))), frames)
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


def _pad_frames(x, cond, text_embed, mask, length: int):
    """Zero frames (masked out) appended up to `length`: exact, the mask keeps padding out of every valid frame."""
    return tuple(pad_axis(v, 1, length) for v in (x, cond, text_embed, mask))


class GraphedSolver:
    """`sampler.euler_solve` replayed as CUDA graphs of `graph_steps` ODE steps each.

    Same contract as `euler_solve`. Frames are padded to a bucket as for the step graphs (exact: the
    mask keeps padding out); one graph per (rows, bucket, steps in the graph, guidance or not), the
    time grid and the guidance strength being graph inputs. `on_step` runs before each replay, with
    the index of its first step: cancellation takes effect every `graph_steps` steps. Calls of more
    than `max_rows` network rows (2 per request with guidance) run the same loop without graphs.

    Packed calls of up to `max_tokens` tokens replay graphs keyed by ("packed", token bucket, steps, guidance):
    tokens rounded up to PACKED_TOKEN_BUCKET, sequences filled up to PACKED_GRAPH_SEQUENCES per branch, the
    packing's tensors graph inputs. Fewer steps a replay as the bucket grows (`packed_steps`), so that a replay
    holds about as much work as a single request's, and a stream scheduler's newcomer waits no longer for one.
    """

    def __init__(self, forward: Callable[..., torch.Tensor], buckets: Sequence[int], graph_steps: int, pool, lock,
                 max_rows: int = 8, max_tokens: int = 0):
        self.forward = forward
        self.buckets = tuple(sorted(buckets))
        self.graph_steps = graph_steps
        self.pool, self.lock = pool, lock
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.graphs: dict[tuple, _CapturedGraph] = {}
        self._fills: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Packing -> _Filled

    def _solve(self, x, cond, text_embed, mask, t, cfg_strength=None):
        return euler_solve(self.forward, x, cond, text_embed, mask, t, cfg_strength)

    def keys_to_cover(self, max_rows: int, max_frames: int, total_steps: int, guided: bool = True) -> list[tuple]:
        """Every graph key a solve of up to `max_rows` rows (2 per request with guidance), `max_frames` frames and
        `total_steps` ODE steps can meet: each row count (even with guidance), each bucket up to the one
        holding `max_frames`, the full segment and the remainder one; then each packed bucket up to `max_tokens`."""
        last = next((b for b in self.buckets if b >= max_frames), self.buckets[-1] if self.buckets else 0)
        step = 2 if guided else 1
        keys = [(rows, bucket, steps, guided) for rows in range(step, min(max_rows, self.max_rows) + 1, step)
                for bucket in self.buckets if bucket <= last for steps in self._segments(self.graph_steps, total_steps)]
        packed = range(PACKED_TOKEN_BUCKET, self.max_tokens + 1, PACKED_TOKEN_BUCKET)
        return keys + [("packed", bucket, steps, guided) for bucket in reversed(packed)  # largest first: the pool
                       for steps in self._segments(self.packed_steps(bucket), total_steps)]

    @staticmethod
    def _segments(per_graph: int, total_steps: int) -> list[int]:
        """The segment lengths a solve of `total_steps` steps replays: the full one and the remainder."""
        return sorted({min(per_graph, total_steps)} | ({total_steps % per_graph} - {0}))

    def packed_steps(self, bucket: int) -> int:
        """ODE steps a packed graph of `bucket` tokens holds: `graph_steps` halved until the replay holds at most
        about a single request's graph's work (`graph_steps` steps of 2 x PACKED_TOKEN_BUCKET tokens)."""
        steps = self.graph_steps
        while steps > 1 and steps * bucket > self.graph_steps * 2 * PACKED_TOKEN_BUCKET:
            steps //= 2
        return steps

    def _packed_bucket(self, mask: Packing, guided: bool) -> int | None:
        """The token bucket of a packed call's graph, or None when no graph takes it."""
        branches = 2 if guided else 1
        requests = mask.sequences // branches
        if mask.max_length != packing_.VARLEN_BOUND or requests >= PACKED_GRAPH_SEQUENCES:
            return None
        spare = PACKED_GRAPH_SEQUENCES - requests  # filler sequences take at least one token each
        bucket = -(-(mask.tokens + branches * spare) // PACKED_TOKEN_BUCKET) * PACKED_TOKEN_BUCKET
        return bucket if bucket <= self.max_tokens else None

    def steps_per_replay(self, mask, guided: bool) -> int:
        """ODE steps one replay takes for a call of `mask` (a stream scheduler's segment): 1 without a graph."""
        if isinstance(mask, Packing):
            bucket = self._packed_bucket(mask, guided)
            return 1 if bucket is None else self.packed_steps(bucket)
        return self.graph_steps

    def capture(self, key: tuple, mel_dim: int, text_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Capture the graph of `key` (from `keys_to_cover`) on zero inputs unless it exists; True if captured."""
        rows, bucket, steps, guided = key
        with self.lock:
            if key in self.graphs:
                return False
            zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
            t = torch.linspace(0, 1, steps + 1, dtype=dtype, device=device)
            with _on(device), torch.inference_mode():
                if rows == "packed":
                    branches = 2 if guided else 1
                    layout = _filled_layout((), bucket, branches, device)
                    inputs = [zeros(bucket // branches, mel_dim), zeros(bucket, mel_dim), zeros(bucket, text_dim), t,
                              zeros(()), *layout.tensors()]
                    self.graphs[key] = _CapturedGraph(self._packed_solve(layout, guided), inputs, self.pool)
                else:
                    inputs = [zeros(rows // 2 if guided else rows, bucket, mel_dim), zeros(rows, bucket, mel_dim),
                              zeros(rows, bucket, text_dim), torch.ones(rows, bucket, dtype=torch.bool, device=device),
                              t] + ([zeros(())] if guided else [])
                    self.graphs[key] = _CapturedGraph(self._solve, inputs, self.pool)
            return True

    def _packed_solve(self, layout: Packing, guided: bool) -> Callable[..., torch.Tensor]:
        """`euler_solve` over packed inputs whose layout tensors are arguments (a graph's inputs)."""
        def solve(x, cond, text_embed, t, cfg_strength, *tensors):
            return euler_solve(self.forward, x, cond, text_embed, layout.with_tensors(*tensors), t,
                               cfg_strength if guided else None)
        return solve

    def __call__(self, x, cond, text_embed, mask, t, cfg_strength=None, on_step=None) -> torch.Tensor:
        with _on(x.device), _noting_compiles(lambda: f"dit_step: {cond.shape[0]} rows x {x.shape[1]} frames"
                                             + (f", packed {mask.sequences} sequences" if isinstance(mask, Packing) else "")):
            return self._call(x, cond, text_embed, mask, t, cfg_strength, on_step)

    def _call(self, x, cond, text_embed, mask, t, cfg_strength, on_step) -> torch.Tensor:
        if isinstance(mask, Packing):  # batches no padded graph covers (`TorchEngine.packs`)
            bucket = self._packed_bucket(mask, cfg_strength is not None)
            if bucket is None:
                return euler_solve(self.forward, x, cond, text_embed, mask, t, cfg_strength, on_step)
            return self._packed_call(x, cond, text_embed, mask, t, cfg_strength, on_step, bucket)
        frames = x.shape[1]
        if mask is None:  # one kind of call for the compiled step, graphed or not
            mask = torch.ones(cond.shape[0], frames, dtype=torch.bool, device=x.device)
        bucket = next((b for b in self.buckets if b >= frames), None)
        if bucket is None or cond.shape[0] > self.max_rows:
            x, cond, text_embed, mask = _pad_frames(x, cond, text_embed, mask, _aligned(frames))
            return euler_solve(self.forward, x, cond, text_embed, mask, t, cfg_strength, on_step)[:, :frames]
        x, cond, text_embed, mask = _pad_frames(x, cond, text_embed, mask, bucket)
        guided = cfg_strength is not None
        cfg = torch.tensor(float(cfg_strength) if guided else 0.0, dtype=x.dtype, device=x.device)
        return self._replay(lambda steps: (cond.shape[0], bucket, steps, guided), self.graph_steps, self._solve,
                            lambda x, ts: [x, cond, text_embed, mask, ts] + ([cfg] if guided else []),
                            x, t, on_step)[:, :frames]

    def _packed_call(self, x, cond, text_embed, mask: Packing, t, cfg_strength, on_step, bucket: int) -> torch.Tensor:
        guided = cfg_strength is not None
        branches = 2 if guided else 1
        filled = self._filled(cond, text_embed, mask, branches, bucket)
        tokens = x.shape[0]
        x = torch.nn.functional.pad(x, (0, 0, 0, bucket // branches - tokens))
        cfg = torch.tensor(float(cfg_strength) if guided else 0.0, dtype=x.dtype, device=x.device)
        return self._replay(lambda steps: ("packed", bucket, steps, guided), self.packed_steps(bucket),
                            self._packed_solve(filled.layout, guided),
                            lambda x, ts: [x, filled.cond, filled.text_embed, ts, cfg, *filled.layout.tensors()],
                            x, t, on_step)[:tokens]

    def _filled(self, cond, text_embed, mask: Packing, branches: int, bucket: int) -> "_Filled":
        """A packed call's conditions and layout filled up to its graph's shape; made once per layout (a solve
        advanced a segment at a time calls with the same ones)."""
        filled = self._fills.get(mask)
        if filled is None or filled.source[0] is not cond or filled.source[1] is not text_embed:
            half, size = mask.tokens // branches, bucket // branches
            pad = lambda v: torch.cat([torch.nn.functional.pad(part, (0, 0, 0, size - half))  # noqa: E731
                                       for part in v.split(half)])
            layout = _filled_layout(mask.lengths[:mask.sequences // branches], bucket, branches, cond.device)
            filled = self._fills[mask] = _Filled((cond, text_embed), pad(cond), pad(text_embed), layout)
        return filled

    def _replay(self, key_of: Callable[[int], tuple], per_graph: int, solve: Callable[..., torch.Tensor],
                inputs_of: Callable[..., list], x: torch.Tensor, t: torch.Tensor, on_step) -> torch.Tensor:
        """Replay the graphs of `per_graph` steps (and the remainder) over the time grid `t`, capturing any missing."""
        total = t.shape[0] - 1
        first = 0
        while first < total:
            steps = min(per_graph, total - first)
            if on_step is not None:
                on_step(first)
            key = key_of(steps)
            inputs = inputs_of(x, t[first:first + steps + 1])
            with self.lock:
                graph = self.graphs.get(key)
                if graph is None:
                    logger.info("dit_step: capturing a CUDA graph of %d ODE steps for %s (rows or packed, bucket, "
                                "steps, guidance)", steps, key)
                    graph = self.graphs[key] = _CapturedGraph(solve, inputs, self.pool)
                x = graph.replay(inputs).clone()  # the static output is overwritten by the next replay
            first += steps
        return x


def _filled_layout(lengths: Sequence[int], bucket: int, branches: int, device) -> Packing:
    """The layout of a packed graph of `bucket` tokens: each guidance branch's sequences (`lengths`) and fillers, up to
    PACKED_GRAPH_SEQUENCES a branch, with the varlen bound every graph is captured with."""
    per_branch = packing_.filled(lengths, bucket // branches, PACKED_GRAPH_SEQUENCES)
    return Packing.of(per_branch * branches, device, max_length=packing_.VARLEN_BOUND)


@dataclass(frozen=True, eq=False)
class _Filled:
    source: tuple  # the call's (cond, text_embed), which these were made from
    cond: torch.Tensor
    text_embed: torch.Tensor
    layout: Packing
