"""Factories: the pipeline objects a Triton model runs (flow matcher, vocoder, requests), built from its typed
settings (`config.ServingSettings`, read once at load from the serving document of its config.pbtxt).

Kept apart from the adapters so the same construction is tested without a server.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from f5_triton.config import Limits, SamplingConfig, ServingSettings
from f5_triton.errors import InvalidInputError
from f5_triton.pipeline import FlowMatcher, Job, Vocoder
from f5_triton.request import SynthesisRequest, validate_request

logger = logging.getLogger(__name__)


def request_from_inputs(fields: dict, sampling: SamplingConfig, limits: Limits) -> SynthesisRequest:
    """A request's wire fields (`request.INPUTS`), validated, with the model's `sampling` defaults where the
    request sends none (ODE steps, guidance, speed), and its sway coefficient (not a wire field)."""
    fields = {**fields, **{name: getattr(sampling, name) for name in ("nfe_steps", "cfg_strength", "speed")
                           if fields.get(name) is None}}
    synthesis = validate_request(**fields, limits=limits)
    synthesis.sway_sampling_coef = sampling.sway_sampling_coef
    return synthesis


def engine_config(settings: ServingSettings, network: str, device: str):
    """The `engines.EngineConfig` of `network` ("dit" or "vocoder") on `device`: the document's `<network>_engine`
    section (EngineConfig's fields; one it does not know is an error naming it)."""
    from f5_triton.engines import EngineConfig

    try:
        return EngineConfig.from_mapping({**getattr(settings, f"{network}_engine"), "device": device})
    except (TypeError, ValueError) as exc:
        raise ValueError(f"serving_config: {network}_engine: {exc}") from None


def load_flow_matcher(settings: ServingSettings, device: str) -> FlowMatcher:
    from f5_triton.checkpoints import load_dit
    from f5_triton.engines import make_dit_runner, torch_dtype
    from f5_triton.text import Tokenizer

    weights = settings.weights
    dtype = torch_dtype(weights.dtype) if device.startswith("cuda") else torch.float32
    model = load_dit(weights.ckpt, Tokenizer(weights.vocab).vocab_size, arch=weights.arch or None, device=device,
                     dtype=dtype)
    return FlowMatcher(make_dit_runner(model, engine_config(settings, "dit", device)), device=device, dtype=dtype)


def warm_up(settings: ServingSettings, flow_matcher: FlowMatcher, vocoder: Vocoder | None = None,
            name: str = "flow_matching", also_nfe_steps: tuple[int, ...] = ()) -> float | None:
    """Run the `warmup` section's synthetic batches through flow matching (and `vocoder`), so compiles and graph
    captures happen while the model loads, then (unless `every_shape` is false) every other shape such batches can
    take up to the frame limit; again for each of `also_nfe_steps` (other step counts the model runs: their CUDA
    graphs' segments differ). Returns the seconds it took, None when off. Progress goes to the package log
    (Triton's log inside a server), prefixed with the model's `name`."""
    warmup = settings.warmup
    if warmup.requests <= 0:
        return None
    start = time.perf_counter()
    for steps in dict.fromkeys((warmup.nfe_steps, *also_nfe_steps)):
        mels = flow_matcher.warm_up(warmup.requests, nfe_steps=steps,
                                    log=lambda message: logger.info("%s: %s", name, message),
                                    max_frames=settings.limits.max_mel_frames if warmup.every_shape else None)
    if vocoder is not None:
        vocoder(mels)
    seconds = time.perf_counter() - start
    logger.info("%s: warmed up in %.1f s (compile, CUDA graphs)", name, seconds)
    return seconds


def load_vocoder(settings: ServingSettings, device: str) -> Vocoder:
    from f5_triton.engines import make_vocoder_runner
    from f5_triton.vocoder import VocosDecoder, load_vocos

    decoder = VocosDecoder(load_vocos(settings.weights.vocoder, device=device)).to(device).eval()
    return Vocoder(make_vocoder_runner(decoder, engine_config(settings, "vocoder", device)), device=device)


def load_flow_vocoder(settings: ServingSettings, device: str) -> Vocoder | None:
    """flow_matching's own Vocoder on its device when its placement says `vocode`, else None.

    With it, flow_matching sends waveforms (wire.WAVE_FIELDS) and the `vocoder` model is not called:
    no second process whose kernels time-slice the GPU with flow matching.
    """
    return load_vocoder(settings, device) if settings.placement.vocode else None


def vocode_together(vocoder: Vocoder, mels: dict[int, list[torch.Tensor]]) -> dict[int, list[np.ndarray]]:
    """Each request's chunk mels [frames, n_mels] -> waveforms, all requests in one batched vocoder call."""
    waves = iter(vocoder([m for chunks in mels.values() for m in chunks]))
    return {index: [next(waves) for _ in chunks] for index, chunks in mels.items()}


def validate_jobs(jobs: list[Job], limits: Limits, vocab_size: int) -> list[Job]:
    """Check jobs that arrive over the wire before they reach an engine.

    `preprocess` only makes valid jobs, but `flow_matching` is a Triton model of its own that a
    client can call directly: anything outside the engines' shape profile or the vocabulary is
    refused with InvalidInputError instead of failing the whole batch (or an engine) later.
    """
    if not jobs:
        raise InvalidInputError("durations", "holds no job", "empty")
    for job in jobs:
        mel_frames = job.ref_mel.shape[0]
        if job.ref_mel.ndim != 2 or not 1 <= mel_frames <= limits.max_mel_frames:
            raise InvalidInputError("ref_mel", f"has shape {tuple(job.ref_mel.shape)}; expected [1..."
                                    f"{limits.max_mel_frames}, n_mels] frames", "bad_shape")
        if not torch.isfinite(job.ref_mel).all():
            raise InvalidInputError("ref_mel", "contains NaN or Inf", "not_finite")
        if not 0 < job.ref_frames <= mel_frames:
            raise InvalidInputError("ref_frames", f"is {job.ref_frames}; allowed range is [1, {mel_frames}]",
                                    "out_of_range")
        if any(not 0 <= t < vocab_size for t in job.tokens):
            raise InvalidInputError("tokens", f"holds ids outside the vocabulary [0, {vocab_size})", "out_of_range")
        if job.duration < 0 or job.total_frames > limits.max_mel_frames:
            raise InvalidInputError("durations", f"job of {job.total_frames} frames; the limit is "
                                    f"{limits.max_mel_frames}", "too_many_frames")
        if not limits.min_nfe_steps <= job.nfe_steps <= limits.max_nfe_steps:
            raise InvalidInputError("nfe_steps", f"is {job.nfe_steps}; allowed range is [{limits.min_nfe_steps}, "
                                    f"{limits.max_nfe_steps}]", "out_of_range")
        if not limits.min_cfg_strength <= job.cfg_strength <= limits.max_cfg_strength:
            raise InvalidInputError("cfg_strength", f"is {job.cfg_strength}; allowed range is "
                                    f"[{limits.min_cfg_strength}, {limits.max_cfg_strength}]", "out_of_range")
        if not -10.0 <= job.sway_sampling_coef <= 10.0:  # NaN fails too
            raise InvalidInputError("sway_sampling_coef", f"is {job.sway_sampling_coef}; allowed range is [-10, 10]",
                                    "out_of_range")
        if job.seed < 0:
            raise InvalidInputError("seeds", f"is {job.seed}; seeds are >= 0", "out_of_range")
    return jobs


def vocoder_items(mel: np.ndarray, frames: np.ndarray | None, limits: Limits) -> list[torch.Tensor]:
    """One vocoder request ([batch, n_mels, frames] + valid frames per item) -> mels [frames_i, n_mels].

    Raises InvalidInputError for lengths outside the mel or the vocoder's profile, or NaN/Inf, so
    that one bad request (the `vocoder` model can be called directly) fails alone.
    """
    frames = [mel.shape[-1]] * len(mel) if frames is None else [int(n) for n in np.asarray(frames).reshape(-1)]
    if len(frames) != len(mel):
        raise InvalidInputError("lengths", f"has {len(frames)} values for {len(mel)} mels", "bad_shape")
    longest = min(mel.shape[-1], limits.max_mel_frames)
    for n in frames:
        if not 1 <= n <= longest:
            raise InvalidInputError("lengths", f"is {n}; allowed range is [1, {longest}] (the mel's frames and the "
                                    "vocoder's limit)", "out_of_range")
    items = [torch.from_numpy(np.ascontiguousarray(m[:, :n])).transpose(0, 1) for m, n in zip(mel, frames)]
    if not all(torch.isfinite(m).all() for m in items):
        raise InvalidInputError("mel", "contains NaN or Inf", "not_finite")
    return items
