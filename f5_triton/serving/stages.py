"""Build the pipeline stages a Triton model runs, from its config `parameters` (strings).

Kept apart from the adapters so the same construction is tested without a server.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from f5_triton.config import DEFAULT_LIMITS, Limits
from f5_triton.errors import InvalidInputError
from f5_triton.pipeline import FlowMatcher, Vocoder

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class GenerationError(RuntimeError):
    """The model produced something that must not be returned as audio (NaN/Inf)."""


def limits_from_params(params: dict[str, str]) -> Limits:
    """Limits with any `limit_<name>` parameter of the model config applied."""
    changes = {}
    for field in dataclasses.fields(Limits):
        value = params.get(f"limit_{field.name}")
        if value is not None:
            changes[field.name] = type(getattr(DEFAULT_LIMITS, field.name))(value)
    return dataclasses.replace(DEFAULT_LIMITS, **changes)


def _bool(value: str | None, default: bool) -> bool:
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def engine_config(params: dict[str, str], prefix: str, device: str):
    from f5_triton.engines import EngineConfig

    from f5_triton.config import CUDA_GRAPH_FRAME_BUCKETS

    return EngineConfig(kind=params.get(f"{prefix}_engine", "torch"), path=params.get(f"{prefix}_engine_path") or None,
                        device=device, fallback=_bool(params.get("engine_fallback"), True),
                        compile=_bool(params.get(f"{prefix}_compile"), False),
                        cuda_graphs=_bool(params.get(f"{prefix}_cuda_graphs"), False),
                        frame_buckets=CUDA_GRAPH_FRAME_BUCKETS)


def load_flow_matcher(params: dict[str, str], device: str) -> FlowMatcher:
    from f5_triton.checkpoints import load_dit
    from f5_triton.engines import make_dit_runner
    from f5_triton.text import Tokenizer

    dtype = DTYPES[params.get("dtype", "fp32")] if device.startswith("cuda") else torch.float32
    model = load_dit(params["ckpt"], Tokenizer(params["vocab"]).vocab_size, arch=params.get("arch") or None,
                     device=device, dtype=dtype)
    runner = make_dit_runner(model, engine_config(params, "dit", device))
    return FlowMatcher(runner, device=device, dtype=dtype)


def load_vocoder(params: dict[str, str], device: str) -> Vocoder:
    from f5_triton.engines import make_vocoder_runner
    from f5_triton.vocoder import VocosDecoder, load_vocos

    decoder = VocosDecoder(load_vocos(params["vocoder"], device=device)).to(device).eval()
    return Vocoder(make_vocoder_runner(decoder, engine_config(params, "vocoder", device)), device=device)


def check_finite(mels: list[torch.Tensor]) -> list[torch.Tensor]:
    for i, mel in enumerate(mels):
        if not torch.isfinite(mel).all():
            raise GenerationError(f"generated mel of chunk {i} contains NaN/Inf; not returned as audio "
                                  f"(try fp32, or report the input)")
    return mels
