"""Euler flow-matching sampler, equivalent to upstream F5-TTS `CFM.sample`.

The network is a `StepModel`: the torch DiT, or an engine runner that runs `step` in torch (compiled,
CUDA graphs), onnxruntime or TensorRT. Text embeddings are computed once per call; classifier-free
guidance evaluates the conditional and unconditional branches as one batch of 2B. The ODE is integrated
by the model's `solver` if it has one, else by the plain Euler loop over its `step` (`f5_triton.solvers`).

A network whose `packs(sequences)` says so runs packed batches (`f5_triton.model.packing`): the
sampler lays the 2B sequences end to end without padding, and `step` gets a `Packing` as its mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from f5_triton.config import DEFAULT_SAMPLING, DiTConfig
from f5_triton.model.dit import lens_to_mask
from f5_triton.model.packing import Packing
from f5_triton.solvers import EulerSolver, Solver

# Empirically pruned step sampling (EPSS): upstream's grids, in 1/32 units, for low NFE.
EPSS_STEPS: dict[int, list[int]] = {
    5: [0, 2, 4, 8, 16, 32],
    6: [0, 2, 4, 6, 8, 16, 32],
    7: [0, 2, 4, 6, 8, 16, 24, 32],
    10: [0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 32],
    12: [0, 2, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32],
    16: [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32],
}


def time_grid(steps: int, sway_sampling_coef: float | None = DEFAULT_SAMPLING.sway_sampling_coef,
              use_epss: bool = True, device=None, dtype=torch.float32) -> torch.Tensor:
    """The `steps + 1` time points from 0 to 1 at which the flow is evaluated (last one is not)."""
    if use_epss and steps in EPSS_STEPS:
        t = torch.tensor(EPSS_STEPS[steps], device=device, dtype=dtype) / 32
    else:
        t = torch.linspace(0, 1, steps + 1, device=device, dtype=dtype)
    if sway_sampling_coef is not None:
        t = t + sway_sampling_coef * (torch.cos(torch.pi / 2 * t) - 1 + t)
    return t


def make_noise(durations: Sequence[int], channels: int, seeds: Sequence[int | None], device, dtype) -> torch.Tensor:
    """Per-request Gaussian noise, zero-padded to the longest request.

    Each request draws from its own generator, so its noise depends only on its seed and length
    (not on its batch neighbours); with a seed it equals upstream's `torch.manual_seed(seed); randn`.
    """
    rows = []
    for duration, seed in zip(durations, seeds):
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        rows.append(torch.randn(int(duration), channels, generator=generator, device=device, dtype=dtype))
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def _as_seeds(seed, batch: int) -> list[int | None]:
    if seed is None or isinstance(seed, int):
        return [seed] * batch
    seeds = [None if s is None else int(s) for s in seed]
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    return seeds


@runtime_checkable
class StepModel(Protocol):
    """What the sampler runs: the eager DiT (`model.DiT`) or a DiT whose step runs in an engine (`engines.DiTRunner`).

    embed_text, step: the DiT's (text embedded once per request; one flow prediction per ODE step, padded batches
    with a [b, n] mask or None, packed ones with a `Packing`). solver: the model's own integration of the grid (the
    torch engine replays it as CUDA graphs), or None: the sampler loops `solvers.euler_solve` over `step`.
    packs(sequences): whether a batch of so many sequences runs packed. cover_shapes: prepare now every shape a
    server of up to `max_requests` requests per batch and `max_frames` frames meets (CUDA graphs), returning how
    many were made: 0 for a model without graphs. config: the DiT's architecture (its text vocabulary).
    """

    config: DiTConfig
    solver: Solver | None

    def embed_text(self, text: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
                   drop_text: bool = False) -> torch.Tensor: ...

    def step(self, x: torch.Tensor, cond: torch.Tensor, text_embed: torch.Tensor, time: torch.Tensor,
             mask: torch.Tensor | Packing | None = None) -> torch.Tensor: ...

    def packs(self, sequences: int) -> bool: ...

    def cover_shapes(self, max_requests: int, max_frames: int, nfe_steps: int,
                     log: Callable[[str], None] | None = None) -> int: ...


@dataclass
class SamplingInputs:
    """What the Euler loop integrates, made once per call by `prepare` (see `sample` for the arguments).

    x: [b, n, c] starting noise; cond: [b, n, c] reference mel (padded to n); cond_mask: [b, n, 1] True on
    the reference frames; step_cond, text_embed, mask: the DiT step's conditions, 2b rows (conditional then
    unconditional) with guidance; t: the time grid; cfg_strength: None without guidance; durations: frames per row.
    """

    x: torch.Tensor
    cond: torch.Tensor
    cond_mask: torch.Tensor
    step_cond: torch.Tensor
    text_embed: torch.Tensor
    mask: torch.Tensor | None
    t: torch.Tensor
    cfg_strength: float | None
    durations: list[int]

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The sampled mel with the reference region restored."""
        return torch.where(self.cond_mask, self.cond, x)


@torch.inference_mode()
def prepare(model: StepModel, cond: torch.Tensor, text: torch.Tensor, duration: int | torch.Tensor, *,
            steps: int = DEFAULT_SAMPLING.nfe_steps,
            cfg_strength: float = DEFAULT_SAMPLING.cfg_strength,
            sway_sampling_coef: float | None = DEFAULT_SAMPLING.sway_sampling_coef, noise: torch.Tensor | None = None,
            seed: int | Sequence[int | None] | None = None, lens: torch.Tensor | None = None, use_epss: bool = True,
            max_duration: int = 65536) -> SamplingInputs:
    """Noise, masks, text embeddings (once per request) and the time grid of a `sample` call."""
    batch, cond_len, channels = cond.shape
    device = cond.device
    if lens is None:
        lens = torch.full((batch,), cond_len, device=device, dtype=torch.long)
    lens = lens.to(device=device, dtype=torch.long)
    if isinstance(duration, int):
        duration = torch.full((batch,), duration, device=device, dtype=torch.long)
    duration = duration.to(device=device, dtype=torch.long)
    # at least one frame more than the reference and than the text, so something is generated
    duration = torch.maximum(torch.maximum((text != -1).sum(dim=-1).to(device), lens) + 1, duration)
    duration = duration.clamp(max=max_duration)
    max_len = int(duration.max())
    durations = duration.tolist()

    cond = torch.nn.functional.pad(cond, (0, 0, 0, max(0, max_len - cond_len)))[:, :max_len]
    cond_mask = lens_to_mask(lens, max_len).unsqueeze(-1)
    step_cond = torch.where(cond_mask, cond, torch.zeros_like(cond))
    mask = None if min(durations) == max_len else lens_to_mask(duration, max_len)

    if noise is None:
        x = make_noise(durations, channels, _as_seeds(seed, batch), device, cond.dtype)
    else:
        x = noise.to(device=device, dtype=cond.dtype)[:, :max_len]
        if x.shape != (batch, max_len, channels):
            raise ValueError(f"noise must have shape {(batch, max_len, channels)}, got {tuple(x.shape)}")

    text = text.to(device)
    use_cfg = cfg_strength >= 1e-5
    text_embed = model.embed_text(text, duration, max_len)
    if use_cfg:  # conditional and unconditional branches as one 2B batch
        text_embed = torch.cat((text_embed, model.embed_text(text, duration, max_len, drop_text=True)))
        step_cond = torch.cat((step_cond, torch.zeros_like(step_cond)))
        mask = None if mask is None else torch.cat((mask, mask))

    t = time_grid(steps, sway_sampling_coef, use_epss, device=device, dtype=cond.dtype)
    return SamplingInputs(x, cond, cond_mask, step_cond, text_embed, mask, t, cfg_strength if use_cfg else None,
                          durations)


@torch.inference_mode()
def sample(
    model: StepModel,
    cond: torch.Tensor,
    text: torch.Tensor,
    duration: int | torch.Tensor,
    *,
    steps: int = DEFAULT_SAMPLING.nfe_steps,
    cfg_strength: float = DEFAULT_SAMPLING.cfg_strength,
    sway_sampling_coef: float | None = DEFAULT_SAMPLING.sway_sampling_coef,
    noise: torch.Tensor | None = None,
    seed: int | Sequence[int | None] | None = None,
    lens: torch.Tensor | None = None,
    use_epss: bool = True,
    max_duration: int = 65536,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Generate mel frames conditioned on a reference mel and text.

    cond: [b, n_ref, mel_dim] reference mel (padded); text: [b, nt] token ids padded with -1;
    duration: total frames (reference + generated) per request; lens: reference frames per request.
    noise: optional [b, max_duration, mel_dim] starting noise, for exact reproduction.
    seed: one seed for all requests or one per request.
    on_step(i): called before step i (cancellation and deadlines raise from here).
    Returns the mel [b, max_duration, mel_dim] with the reference region restored.
    """
    inputs = prepare(model, cond, text, duration, steps=steps, cfg_strength=cfg_strength,
                     sway_sampling_coef=sway_sampling_coef, noise=noise, seed=seed, lens=lens, use_epss=use_epss,
                     max_duration=max_duration)
    solving = Solving(model, inputs)
    solving.advance(on_step=on_step)
    return solving.result()


class Solving:
    """A prepared `sample` call's Euler integration, advanced a few steps at a time (`advance`).

    The stream scheduler interleaves batches this way. Steps i..j are `euler_solve` on the sub-grid t[i..j],
    exactly the arithmetic of the whole loop, so any split gives `sample`'s result. The model's `solver` integrates
    the grid if it has one (the torch engine replays it as CUDA graphs), else `EulerSolver` over its `step`; a model
    whose `packs` says so runs the batch packed, the sequences laid end to end without padding.
    """

    @torch.inference_mode()  # inputs made outside it would recompile a compiled step (a tensor's dispatch keys)
    def __init__(self, model: StepModel, inputs: SamplingInputs):
        self.inputs = inputs
        self._solver: Solver = EulerSolver(model.step) if model.solver is None else model.solver
        self.index = 0  # the next step
        x = inputs.x
        self._valid = None
        if model.packs(inputs.step_cond.shape[0]):
            self._valid = lens_to_mask(torch.tensor(inputs.durations, device=x.device), x.shape[1])
            branches = 1 if inputs.cfg_strength is None else 2
            step_valid = self._valid if branches == 1 else torch.cat((self._valid, self._valid))
            self._x, self._cond, self._text = x[self._valid], inputs.step_cond[step_valid], inputs.text_embed[step_valid]
            self._mask = Packing.of(inputs.durations * branches, x.device)
        else:
            self._x, self._cond, self._text, self._mask = x, inputs.step_cond, inputs.text_embed, inputs.mask

    @property
    def steps(self) -> int:
        return self.inputs.t.shape[0] - 1

    @property
    def done(self) -> bool:
        return self.index >= self.steps

    @property
    def segment(self) -> int:
        """The steps one `advance` should take: a CUDA graph's (the engine replays whole graphs), else one."""
        return self._solver.steps_per_replay(self._mask, self.inputs.cfg_strength is not None)

    @torch.inference_mode()
    def advance(self, steps: int | None = None, on_step: Callable[[int], None] | None = None) -> None:
        """The next `steps` steps (None: all that are left); `on_step(i)` before step i, as in `sample`."""
        first = self.index
        end = self.steps if steps is None else min(self.steps, first + steps)
        hook = None if on_step is None else (lambda i: on_step(first + i))
        self._x = self._solver(self._x, self._cond, self._text, self._mask, self.inputs.t[first:end + 1],
                               self.inputs.cfg_strength, hook)
        self.index = end

    @torch.inference_mode()
    def result(self) -> torch.Tensor:
        """The sampled mel [b, n, c] with the reference region restored (once `done`)."""
        x = self._x if self._valid is None else self.inputs.x.masked_scatter(self._valid.unsqueeze(-1), self._x)
        return self.inputs.finish(x)
