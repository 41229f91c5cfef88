"""Tensors that travel between the ensemble's steps, packed and unpacked in one place.

Each function works on one request's arrays, without Triton's batch dimension; the adapters in
model_repo/*/1/model.py add and strip it.
"""

from __future__ import annotations

import numpy as np
import torch

from f5_triton.pipeline import Job, Prepared


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
        "sampling": np.array([first.nfe_steps, first.cfg_strength, first.sway_sampling_coef], dtype=np.float32),
        "ref_rms": np.array([prepared.ref_rms], dtype=np.float32),
    }


def unpack_jobs(arrays: dict[str, np.ndarray], request_index: int = 0) -> list[Job]:
    """flow_matching's inputs for one request -> its jobs (one per text chunk)."""
    ref_mel = torch.from_numpy(np.ascontiguousarray(arrays["ref_mel"], dtype=np.float32))
    nfe_steps, cfg_strength, sway = (float(v) for v in arrays["sampling"].reshape(-1)[:3])
    tokens = arrays["tokens"].reshape(len(arrays["durations"].reshape(-1)), -1)
    return [
        Job(request_index=request_index, chunk_index=i, ref_mel=ref_mel,
            ref_frames=int(arrays["ref_frames"].reshape(-1)[0]), tokens=[int(t) for t in row if t != -1],
            duration=int(duration), seed=int(seed), nfe_steps=int(nfe_steps), cfg_strength=cfg_strength,
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
