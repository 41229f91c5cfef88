"""How the flow-matching ODE is integrated: the Euler loop (`euler_solve`), eager or replayed as CUDA graphs.

A `Solver` integrates a prepared batch over a time grid with `euler_solve`'s contract. `EulerSolver` is the
plain loop over a network's `step`, one call per ODE step; `GraphedSolver` captures that same loop, CFG and
updates included, `graph_steps` ODE steps per CUDA graph, so a 16-step request is two replays instead of 16 DiT
calls with their padding, copies and Python in between. The torch engine builds the graphed one over its
(compiled) step (`engines.torch_engine.TorchEngine.solver`); `sampler.Solving` runs whichever the model offers.

The CUDA-graph mechanics both the graphed solver and the torch engine's per-step graphs use are here too:
`CapturedGraph` (one capture with its static buffers), `on_device`, `noting_compiles`, `aligned`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from f5_triton.model import packing as packing_
from f5_triton.model.packing import Packing

logger = logging.getLogger(__name__)


@runtime_checkable
class Solver(Protocol):
    """Integrates the flow over a time grid: `euler_solve`'s contract, less its `step` (the solver has its own)."""

    def __call__(self, x: torch.Tensor, cond: torch.Tensor, text_embed: torch.Tensor, mask, t: torch.Tensor,
                 cfg_strength: float | torch.Tensor | None = None,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor: ...

    def steps_per_replay(self, mask, guided: bool) -> int:
        """ODE steps one call should take for a batch of `mask` (a stream scheduler's segment: `Solving.segment`);
        a CUDA graph's steps, as a graphed solver replays whole graphs. The plain loop: 1."""
        return 1


def euler_solve(step, x: torch.Tensor, cond: torch.Tensor, text_embed: torch.Tensor, mask: torch.Tensor | None,
                t: torch.Tensor, cfg_strength: float | torch.Tensor | None = None,
                on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Integrate the flow from x at t[0] to t[-1] with one Euler step per grid interval.

    step: the DiT's `step(x, cond, text_embed, time, mask)`. Without guidance (cfg_strength None)
    cond, text_embed and mask have the B rows of x; with it, 2B rows: conditional then unconditional.
    Packed (mask a `Packing`): x, cond, text_embed are [tokens, c], the conditional sequences first.
    on_step(i) is called before step i. No host syncs: this is also what CUDA graphs capture.
    """
    rows = mask.sequences if isinstance(mask, Packing) else cond.shape[0]
    for i in range(t.shape[0] - 1):
        if on_step is not None:
            on_step(i)
        time = t[i].expand(rows)
        if cfg_strength is None:
            flow = step(x, cond, text_embed, time, mask)
        else:
            pred, null_pred = step(torch.cat((x, x)), cond, text_embed, time, mask).chunk(2)
            flow = pred + (pred - null_pred) * cfg_strength
        x = x + (t[i + 1] - t[i]) * flow
    return x


@dataclass(frozen=True)
class EulerSolver(Solver):
    """`euler_solve` over `step` (the DiT's, or an engine runner's): one network call per ODE step."""

    step: Callable[..., torch.Tensor]

    def __call__(self, x, cond, text_embed, mask, t, cfg_strength=None, on_step=None) -> torch.Tensor:
        return euler_solve(self.step, x, cond, text_embed, mask, t, cfg_strength, on_step)


# --- CUDA graphs: what the graphed solver and the torch engine's per-step graphs share

# Calls without a CUDA graph still pad frames to a multiple of this (exact: padding is masked): under
# torch.compile an unaligned attention mask gets padded and materialized. H200, 32-row masked step: 77.7 ms at
# 1361 frames, 63.5 at 1368. Padding to 64 like the graph buckets: 61.8 ms at 1408 compiled statically, yet the
# server (dynamic-shape compile) then gave 136 audio s/s at concurrency 64 instead of 142 (docs/benchmarks.md).
FRAME_ALIGNMENT = 8


def aligned(frames: int) -> int:
    """`frames` rounded up to a multiple of FRAME_ALIGNMENT."""
    return -(-frames // FRAME_ALIGNMENT) * FRAME_ALIGNMENT


def _graphs_compiled() -> int:
    """Graphs torch.compile has built in this process (0 before its first use: no import for eager engines)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def noting_compiles(describe_call: Callable[[], str], log: logging.Logger = logger):
    """Log (to `log`) when a call made torch.compile build graphs: expected during warm-up, a stall of seconds under
    load. `describe_call` runs only then (nothing formatted on the hot path)."""
    before, start = _graphs_compiled(), time.perf_counter()
    yield
    built = _graphs_compiled() - before
    if built:
        log.info("%s: torch.compile built %d graph(s), call took %.1f s", describe_call(), built,
                    time.perf_counter() - start)


def on_device(device: torch.device):
    """Make `device` current: streams and graph captures belong to the current device, which is cuda:0
    by default even in a process whose model lives on cuda:1 (a Triton instance on the second GPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class CapturedGraph:
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


# Packed graphs: tokens (both guidance branches) rounded up to a multiple of this; each branch holds this many
# sequences, requests and fillers, so a batch of up to PACKED_GRAPH_SEQUENCES - 1 requests fits one graph.
PACKED_TOKEN_BUCKET = 1024
PACKED_GRAPH_SEQUENCES = 16


def _pad_frames(length: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[rows, frames, ...] tensors with zero frames (False in the mask) appended up to `length`: exact, the mask
    keeps padding out of every valid frame."""
    return tuple(torch.nn.functional.pad(v, (0, 0) * (v.ndim - 2) + (0, length - v.shape[1])) for v in tensors)


class GraphedSolver(Solver):
    """`euler_solve` replayed as CUDA graphs of `graph_steps` ODE steps each.

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
        self.graphs: dict[tuple, CapturedGraph] = {}
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
            with on_device(device), torch.inference_mode():
                if rows == "packed":
                    branches = 2 if guided else 1
                    layout = _filled_layout((), bucket, branches, device)
                    inputs = [zeros(bucket // branches, mel_dim), zeros(bucket, mel_dim), zeros(bucket, text_dim), t,
                              zeros(()), *layout.tensors()]
                    self.graphs[key] = CapturedGraph(self._packed_solve(layout, guided), inputs, self.pool)
                else:
                    inputs = [zeros(rows // 2 if guided else rows, bucket, mel_dim), zeros(rows, bucket, mel_dim),
                              zeros(rows, bucket, text_dim), torch.ones(rows, bucket, dtype=torch.bool, device=device),
                              t] + ([zeros(())] if guided else [])
                    self.graphs[key] = CapturedGraph(self._solve, inputs, self.pool)
            return True

    def _packed_solve(self, layout: Packing, guided: bool) -> Callable[..., torch.Tensor]:
        """`euler_solve` over packed inputs whose layout tensors are arguments (a graph's inputs)."""
        def solve(x, cond, text_embed, t, cfg_strength, *tensors):
            return euler_solve(self.forward, x, cond, text_embed, layout.with_tensors(*tensors), t,
                               cfg_strength if guided else None)
        return solve

    def __call__(self, x, cond, text_embed, mask, t, cfg_strength=None, on_step=None) -> torch.Tensor:
        with on_device(x.device), noting_compiles(lambda: f"dit_step: {cond.shape[0]} rows x {x.shape[1]} frames"
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
            x, cond, text_embed, mask = _pad_frames(aligned(frames), x, cond, text_embed, mask)
            return euler_solve(self.forward, x, cond, text_embed, mask, t, cfg_strength, on_step)[:, :frames]
        x, cond, text_embed, mask = _pad_frames(bucket, x, cond, text_embed, mask)
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
                    graph = self.graphs[key] = CapturedGraph(solve, inputs, self.pool)
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
