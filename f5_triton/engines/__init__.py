"""Inference engines for the DiT step and the vocoder, chosen by configuration.

    config = EngineConfig(kind="onnxruntime", path="onnx/dit_step.onnx", device="cuda")
    tts = TTS.from_paths(ckpt, vocab, vocos, device="cuda", engine=lambda dit: make_dit_runner(dit, config))
    tts.vocoder = make_vocoder_runner(tts.vocoder, EngineConfig(kind="tensorrt", path="plans/vocoder.plan"))

`load_engine` returns an `Engine` of the configured kind or, when that kind cannot be loaded here
(missing file or package, no GPU, corrupt or incompatible plan), the torch engine with a loud
warning; with `fallback=False` it raises `EngineUnavailable` instead. `DiTRunner` and
`VocoderRunner` put an engine behind the interfaces the sampler and the pipeline already use, so
the rest of the code does not know which engine runs.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Callable

import torch
from torch import nn

from f5_triton.config import DiTConfig
from f5_triton.engines.base import (
    DIT_INPUTS,
    DIT_OUTPUTS,
    DIT_STEP,
    ENGINE_ALIASES,
    ENGINE_KINDS,
    NETWORKS,
    VOCODER,
    VOCODER_INPUTS,
    VOCODER_OUTPUTS,
    Engine,
    EngineConfig,
    EngineFallbackWarning,
    EngineUnavailable,
    NetworkSpec,
    ShapeOutOfRange,
    TensorSpec,
    torch_dtype,
)
from f5_triton.engines.networks import DiTStep, VocoderNetwork, as_network
from f5_triton.engines.torch_engine import TorchEngine
from f5_triton.model.packing import Packing
from f5_triton.solvers import Solver

logger = logging.getLogger(__name__)

__all__ = [
    "DIT_INPUTS", "DIT_OUTPUTS", "DIT_STEP", "ENGINE_ALIASES", "ENGINE_KINDS", "NETWORKS", "VOCODER", "VOCODER_INPUTS",
    "VOCODER_OUTPUTS", "DiTRunner", "DiTStep", "Engine", "EngineConfig", "EngineFallbackWarning",
    "EngineUnavailable", "NetworkSpec", "ShapeOutOfRange", "TensorSpec", "TorchEngine", "VocoderNetwork",
    "VocoderRunner", "load_engine", "make_dit_runner", "make_vocoder_runner", "torch_dtype",
]


def _load_file_engine(config: EngineConfig, spec: NetworkSpec) -> Engine:
    if config.kind == "onnxruntime":
        from f5_triton.engines.onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(spec, config)
    from f5_triton.engines.tensorrt_engine import TensorRTEngine

    return TensorRTEngine(spec, config)


def load_engine(config: EngineConfig, torch_module: nn.Module) -> Engine:
    """The engine `config` asks for, running `torch_module`'s network (a DiT, VocosDecoder or DiTStep...).

    The torch module is what the torch engine runs, also as the fallback of the other kinds.
    """
    network = as_network(torch_module)
    spec = network.spec
    if config.kind == "torch":
        return TorchEngine(network, spec, config)
    try:
        return _load_file_engine(config, spec)
    except EngineUnavailable as exc:
        if not config.fallback:
            raise
        message = (f"{spec.name}: the {config.kind} engine cannot be used: {exc}. FALLING BACK TO THE TORCH "
                   f"ENGINE, which is slower; fix the cause, or set fallback=False to make this an error.")
        logger.error(message)
        warnings.warn(message, EngineFallbackWarning, stacklevel=2)
        return TorchEngine(network, spec, dataclasses.replace(config, kind="torch"))


class DiTRunner:
    """A DiT whose per-step network runs in an engine; usable wherever the DiT is (a `sampler.StepModel`).

    `embed_text` runs once per request in torch, from the model; `step` goes through the engine, and so do
    `solver`, `packs` and `cover_shapes` (the `Engine` interface's: an exported graph's engine has no solver,
    takes padded batches and has no shapes to prepare).
    """

    def __init__(self, model: nn.Module, step_engine: Engine):
        if step_engine.spec is not DIT_STEP:
            raise TypeError(f"DiTRunner needs a {DIT_STEP.name} engine, got one for {step_engine.spec.name}")
        self.model = model
        self.engine = step_engine

    @property
    def kind(self) -> str:
        return self.engine.kind

    @property
    def config(self) -> DiTConfig:
        """The DiT's architecture (its text vocabulary, dimensions)."""
        return self.model.config

    @property
    def solver(self) -> Solver | None:
        """The engine's own ODE integration (the torch engine's CUDA graphs), or None: the sampler loops over `step`."""
        return self.engine.solver

    def packs(self, sequences: int) -> bool:
        """Whether the sampler should pack a batch of `sequences` (`sampler.Solving`): as the engine says (the torch
        engine: batches no CUDA graph covers); engines of exported graphs take padded batches."""
        return self.engine.packs(sequences)

    def cover_shapes(self, max_requests: int, max_frames: int, nfe_steps: int,
                     log: Callable[[str], None] | None = None) -> int:
        """Have the engine prepare every shape a server of up to `max_requests` requests per batch and `max_frames`
        frames meets (the torch engine: all its CUDA graphs; `TorchEngine.cover_shapes`); returns how many it made."""
        return self.engine.cover_shapes(2 * max_requests, max_frames, nfe_steps, self.model.mel_dim,
                                        self.model.config.text_dim, log)

    def embed_text(self, text: torch.Tensor, seq_lens: torch.Tensor, max_len: int, drop_text: bool = False):
        return self.model.embed_text(text, seq_lens, max_len, drop_text=drop_text)

    def step(self, x: torch.Tensor, cond: torch.Tensor, text_embed: torch.Tensor, time: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as `DiT.step`; a None mask (no request padded) becomes all-True, a scalar time per-row.
        A packed batch (mask a `Packing`) goes to the engine as it is."""
        if isinstance(mask, Packing):
            return self.engine(x, cond, text_embed, time, mask).to(device=x.device, dtype=x.dtype)
        batch, frames = x.shape[0], x.shape[1]
        if time.ndim == 0:
            time = time.expand(batch)
        if mask is None:
            mask = torch.ones(batch, frames, dtype=torch.bool, device=x.device)
        flow = self.engine(x, cond, text_embed, time, mask.to(torch.bool))
        return flow.to(device=x.device, dtype=x.dtype)


def make_dit_runner(model: nn.Module, config: EngineConfig) -> DiTRunner:
    """DiTRunner over the engine `config` chooses; fits `TTS.from_paths(..., engine=lambda dit: ...)`."""
    return DiTRunner(model, load_engine(config, DiTStep(model)))


class VocoderRunner(nn.Module):
    """A vocoder running in an engine, usable wherever `VocosDecoder` is (`TTS.vocoder`, `decode_batch`).

    Calls: mel [b, n_mels, frames] (+ lengths [b]) -> waveform [b, frames * hop]. The decoder is
    kept for its parameters' device/dtype and its ISTFT settings, which callers read.
    """

    def __init__(self, decoder: nn.Module, engine: Engine):
        super().__init__()
        if engine.spec is not VOCODER:
            raise TypeError(f"VocoderRunner needs a {VOCODER.name} engine, got one for {engine.spec.name}")
        self.decoder = decoder
        self.engine = engine

    @property
    def kind(self) -> str:
        return self.engine.kind

    @property
    def istft(self) -> nn.Module:
        return self.decoder.istft

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if lengths is None:
            lengths = torch.full((mel.shape[0],), mel.shape[-1], dtype=torch.int64, device=mel.device)
        wave = self.engine(mel, lengths.to(torch.int64))
        return wave.to(device=mel.device, dtype=mel.dtype)


def make_vocoder_runner(decoder: nn.Module, config: EngineConfig) -> VocoderRunner:
    """VocoderRunner over the engine `config` chooses, for a `VocosDecoder`."""
    return VocoderRunner(decoder, load_engine(config, VocoderNetwork(decoder)))
