"""Tensors that travel between the ensemble's steps, packed and unpacked in one place.

Each function works on one request's arrays, without Triton's batch dimension; the adapters in
model_repo/*/1/model.py add and strip it.

flow_matching hands a request's chunks to postprocess in one of two forms, chosen when the
repository is rendered (`RepositoryOptions.vocoder_in_flow`):

  MEL_FIELDS   mel + mel_frames       postprocess vocodes them through the `vocoder` model (BLS)
  WAVE_FIELDS  waves + wave_samples   flow_matching vocoded them in its own process already

Light to import (numpy only): the repository renderer reads the field declarations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from f5_triton.config import N_MELS
from f5_triton.errors import InvalidInputError
from f5_triton.request import WireField

if TYPE_CHECKING:
    import torch

    from f5_triton.pipeline import Job, Prepared

#: preprocess -> flow_matching: one request's jobs (`pack_prepared` / `unpack_jobs`), one per text chunk sharing the
#: reference and the sampling settings, each typed as it is used. The repository renders preprocess's outputs,
#: flow_matching's inputs (ragged where a dimension varies) and the ensemble's maps between them from this table.
JOB_FIELDS: tuple[WireField, ...] = (
    WireField("ref_mel", "TYPE_FP32", (-1, N_MELS), False, "the reference's mel [frames, n_mels]"),
    WireField("ref_frames", "TYPE_INT32", (1,), False, "frames of the reference in ref_mel"),
    WireField("tokens", "TYPE_INT32", (-1, -1), False, "each chunk's text tokens, padded with -1"),
    WireField("durations", "TYPE_INT32", (-1,), False, "each chunk's frames to generate"),
    WireField("seeds", "TYPE_INT64", (-1,), False, "each chunk's noise seed"),
    WireField("nfe_steps", "TYPE_INT32", (1,), False, "ODE steps"),
    WireField("cfg_strength", "TYPE_FP32", (1,), False, "classifier-free guidance strength"),
    WireField("sway_sampling_coef", "TYPE_FP32", (1,), False, "sway sampling of the time grid"),
)
MEL_FIELDS: tuple[WireField, ...] = (
    WireField("mel", "TYPE_FP32", (-1, N_MELS, -1), False, "a request's chunk mels, padded to the longest"),
    WireField("mel_frames", "TYPE_INT32", (-1,), False, "valid frames of each chunk's mel"),
)
WAVE_FIELDS: tuple[WireField, ...] = (
    WireField("waves", "TYPE_FP32", (-1, -1), False, "a request's chunk waveforms, padded to the longest"),
    WireField("wave_samples", "TYPE_INT32", (-1,), False, "valid samples of each chunk's waveform"),
)


#: preprocess -> flow_matching: the request's output-cache key (`cache.request_output_key`), empty when it has none
#: (no seed). flow_matching answers a key it has kept from its output cache, without running the DiT.
OUTPUT_KEY = "output_key"


def pack_output_key(key: str | None) -> np.ndarray:
    return np.array([(key or "").encode("ascii")], dtype=np.object_)


def unpack_output_key(value: np.ndarray | None) -> str | None:
    """The key flow_matching received, or None (not sent: a direct call; empty: a request without a seed)."""
    if value is None:
        return None
    key = value.reshape(-1)[0]
    return (key.decode("ascii") if isinstance(key, bytes) else str(key)) or None


def pack_prepared(prepared: Prepared) -> dict[str, np.ndarray]:
    """preprocess -> flow_matching (and ref_rms -> postprocess)."""
    jobs = prepared.jobs
    first = jobs[0]
    longest = max(len(j.tokens) for j in jobs)
    tokens = np.full((len(jobs), longest), -1, dtype=np.int32)
    for row, job in zip(tokens, jobs):
        row[:len(job.tokens)] = job.tokens
    return {
        "ref_mel": first.ref_mel.numpy().astype(np.float32),
        "ref_frames": np.array([first.ref_frames], dtype=np.int32),
        "tokens": tokens,
        "durations": np.array([j.duration for j in jobs], dtype=np.int32),
        "seeds": np.array([j.seed for j in jobs], dtype=np.int64),
        "nfe_steps": np.array([first.nfe_steps], dtype=np.int32),
        "cfg_strength": np.array([first.cfg_strength], dtype=np.float32),
        "sway_sampling_coef": np.array([first.sway_sampling_coef], dtype=np.float32),
        "ref_rms": np.array([prepared.ref_rms], dtype=np.float32),
    }


def unpack_jobs(arrays: dict[str, np.ndarray], request_index: int = 0) -> list[Job]:
    """flow_matching's inputs for one request -> its jobs (one per text chunk)."""
    import torch

    from f5_triton.pipeline import Job

    ref_mel = torch.from_numpy(np.ascontiguousarray(arrays["ref_mel"], dtype=np.float32))
    nfe_steps, cfg_strength, sway = (arrays[name].reshape(-1)[0].item()
                                     for name in ("nfe_steps", "cfg_strength", "sway_sampling_coef"))
    tokens = arrays["tokens"].reshape(len(arrays["durations"].reshape(-1)), -1)
    return [
        Job(request_index=request_index, chunk_index=i, ref_mel=ref_mel,
            ref_frames=int(arrays["ref_frames"].reshape(-1)[0]), tokens=[int(t) for t in row if t != -1],
            duration=int(duration), seed=int(seed), nfe_steps=nfe_steps, cfg_strength=cfg_strength,
            sway_sampling_coef=sway)
        for i, (row, duration, seed) in enumerate(zip(tokens, arrays["durations"].reshape(-1),
                                                      arrays["seeds"].reshape(-1)))
    ]


def pack_mels(mels: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """flow_matching -> postprocess: a request's chunk mels [frames, n_mels], padded to [chunks, n_mels, max]."""
    longest = max(m.shape[0] for m in mels)
    packed = np.zeros((len(mels), mels[0].shape[1], longest), dtype=np.float32)
    for out, mel in zip(packed, mels):
        out[:, :mel.shape[0]] = mel.transpose(0, 1).cpu().numpy()
    return {"mel": packed, "mel_frames": np.array([m.shape[0] for m in mels], dtype=np.int32)}


def unpack_mels(mel: np.ndarray, mel_frames: np.ndarray) -> list[np.ndarray]:
    """[chunks, n_mels, max] + frames -> one [n_mels, frames_i] array per chunk."""
    return [np.ascontiguousarray(m[:, :int(n)]) for m, n in zip(mel, mel_frames.reshape(-1))]


def pack_waves(waves: list[np.ndarray]) -> dict[str, np.ndarray]:
    """flow_matching (vocoding in process) -> postprocess: a request's chunk waveforms, padded to [chunks, max]."""
    longest = max(len(w) for w in waves)
    packed = np.zeros((len(waves), longest), dtype=np.float32)
    for out, wave in zip(packed, waves):
        out[:len(wave)] = wave
    return {"waves": packed, "wave_samples": np.array([len(w) for w in waves], dtype=np.int32)}


def unpack_waves(waves: np.ndarray, wave_samples: np.ndarray) -> list[np.ndarray]:
    """[chunks, max] + samples -> one waveform per chunk."""
    return [np.ascontiguousarray(w[:int(n)]) for w, n in zip(waves, wave_samples.reshape(-1))]


def unpack_chunks(arrays: dict[str, np.ndarray | None]) -> tuple[str, list[np.ndarray]]:
    """postprocess's chunk inputs -> ("mel", one [n_mels, frames_i] per chunk) or ("waves", one waveform per chunk).

    Both pairs are optional in postprocess's config (the repository decides which one flow_matching
    sends): exactly one complete pair must be present, with one count per chunk inside the padded
    tensor; anything else is an InvalidInputError naming the fields.
    """
    pairs = [tuple(f.name for f in MEL_FIELDS), tuple(f.name for f in WAVE_FIELDS)]
    present = {name for pair in pairs for name in pair if arrays.get(name) is not None}
    pair = next((p for p in pairs if present == set(p)), None)
    if pair is None:
        names = [name for p in pairs for name in p]
        raise InvalidInputError(
            "/".join(names), f"send either {' + '.join(pairs[0])} or {' + '.join(pairs[1])}; got "
            f"{', '.join(n for n in names if n in present) or 'none of them'}", "bad_shape")
    data_name, counts_name = pair
    data, counts = arrays[data_name], np.asarray(arrays[counts_name]).reshape(-1)
    ndim = len(next(f.dims for f in MEL_FIELDS + WAVE_FIELDS if f.name == data_name))
    if data.ndim != ndim or len(data) == 0 or len(counts) != len(data):
        raise InvalidInputError(counts_name, f"has {len(counts)} values for {data_name} of shape {tuple(data.shape)}; "
                                "expected one per chunk", "bad_shape")
    if any(not 1 <= int(n) <= data.shape[-1] for n in counts):
        raise InvalidInputError(counts_name, f"holds {counts.tolist()}; each must lie in [1, {data.shape[-1]}] "
                                f"(the padded {data_name})", "out_of_range")
    return (data_name, unpack_mels(data, counts) if data_name == "mel" else unpack_waves(data, counts))
