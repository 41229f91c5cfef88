"""Vocos mel-24khz: loading, an ONNX-exportable decoder, batched decoding, random test weights.

`VocosDecoder` runs Vocos' backbone and ISTFT head with our `ISTFT` in place of vocos' own, because
`torch.istft` / `torch.fft.irfft` (complex tensors) do not export to ONNX. Given per-item lengths it
also keeps padding out of every item's result, so a batch decodes each request as if it were alone.

The head is the published one (`padding: center`, as `torch.istft(center=True)`): n mel frames give
(n - 1) * 256 samples (`config.vocoder_samples`), and everything downstream counts in that length.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from vocos import Vocos
from vocos.feature_extractors import MelSpectrogramFeatures
from vocos.heads import ISTFTHead
from vocos.models import VocosBackbone

from f5_triton.config import HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, vocoder_samples
from f5_triton.errors import CheckpointError

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "pytorch_model.bin"
_HINT = (
    "expected the layout of charactr/vocos-mel-24khz (config.yaml + pytorch_model.bin); "
    "download it with f5-triton build checkpoint --model NAME --ckpt-dir ckpts, or "
    "scripts/make_random_checkpoint.py for random test weights"
)


# --------------------------------------------------------------------------------------------
# Loading


def load_vocos(folder: str | os.PathLike, device: str | torch.device = "cpu") -> Vocos:
    """Load a mel Vocos from a local folder (config.yaml + pytorch_model.bin), strictly, in eval mode."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Vocos folder {folder} does not exist; {_HINT}")
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    missing = [p.name for p in (config_path, weights_path) if not p.is_file()]
    if missing:
        raise CheckpointError(f"Vocos folder {folder} lacks {', '.join(missing)}; {_HINT}")

    try:
        vocos = Vocos.from_hparams(str(config_path))
    except Exception as exc:  # yaml, missing keys, unknown class paths, bad init args
        raise CheckpointError(f"cannot build Vocos from {config_path}: {exc!r}; {_HINT}") from exc
    if not (
        isinstance(vocos.feature_extractor, MelSpectrogramFeatures)
        and isinstance(vocos.backbone, VocosBackbone)
        and not vocos.backbone.adanorm
        and isinstance(vocos.head, ISTFTHead)
        and vocos.head.istft.padding == "center"
    ):
        raise CheckpointError(
            f"{config_path} is not a mel Vocos (MelSpectrogramFeatures, VocosBackbone without "
            f"adanorm, ISTFTHead with padding 'center' as published); {_HINT}"
        )

    try:
        state_dict = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated/corrupt zip, pickle errors, unsafe objects
        raise CheckpointError(f"cannot read Vocos weights {weights_path}: {exc!r}; {_HINT}") from exc
    if not isinstance(state_dict, dict):
        kind = type(state_dict).__name__
        raise CheckpointError(f"{weights_path} holds a {kind}, not a state dict; {_HINT}")
    try:
        vocos.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # missing/unexpected keys, shape mismatches
        raise CheckpointError(f"Vocos weights {weights_path} do not match {config_path}: {exc}") from exc
    return vocos.eval().to(device)


def vocos_config(small: bool = False) -> dict:
    """The config.yaml of charactr/vocos-mel-24khz (as published), or a tiny variant: only the sizes differ."""
    dim, intermediate_dim, num_layers = (64, 192, 2) if small else (512, 1536, 8)
    return {
        "feature_extractor": {
            "class_path": "vocos.feature_extractors.MelSpectrogramFeatures",
            "init_args": {
                "sample_rate": SAMPLE_RATE,
                "n_fft": N_FFT,
                "hop_length": HOP_LENGTH,
                "n_mels": N_MELS,
                "padding": "center",
            },
        },
        "backbone": {
            "class_path": "vocos.models.VocosBackbone",
            "init_args": {
                "input_channels": N_MELS,
                "dim": dim,
                "intermediate_dim": intermediate_dim,
                "num_layers": num_layers,
            },
        },
        "head": {
            "class_path": "vocos.heads.ISTFTHead",
            "init_args": {"dim": dim, "n_fft": N_FFT, "hop_length": HOP_LENGTH, "padding": "center"},
        },
    }


def make_random_vocos(folder: str | os.PathLike, seed: int = 0, small: bool = True) -> Path:
    """Write a Vocos folder with random weights (vocos' own init) that `load_vocos` accepts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / CONFIG_FILE
    config_path.write_text(yaml.safe_dump(vocos_config(small), sort_keys=False))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vocos = Vocos.from_hparams(str(config_path))
    torch.save(vocos.state_dict(), folder / WEIGHTS_FILE)
    return folder


# --------------------------------------------------------------------------------------------
# Exportable inverse STFT


class ISTFT(nn.Module):
    """Inverse STFT equal to `torch.istft(center=True)` (vocos' ISTFT with padding "center"), built from
    ONNX-friendly ops.

    One `conv_transpose1d` with a fixed [inverse real DFT x hann window] basis does the inverse
    transform, windowing and overlap-add of all frames at once; a second one of window^2 gives the
    window envelope, for any number of frames; n_fft / 2 samples are trimmed at both ends. Input is
    (real, imag) [b, n_fft // 2 + 1, frames]; output is [b, (frames - 1) * hop_length]. An optional
    frame mask [b, 1, frames] (1 = valid) leaves the masked frames out of the envelope, so a padded
    item's valid samples match its unpadded result.
    """

    def __init__(self, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.pad = n_fft // 2

        n_bins = n_fft // 2 + 1
        window = torch.hann_window(n_fft, dtype=torch.float64)
        k = torch.arange(n_bins, dtype=torch.int64)[:, None]
        n = torch.arange(n_fft, dtype=torch.int64)[None, :]
        angle = 2 * math.pi * ((k * n) % n_fft).double() / n_fft  # reduce k*n first: exact angles
        # irfft weights: DC and Nyquist once, the other bins twice (their mirrored conjugates).
        scale = torch.full((n_bins, 1), 2.0 / n_fft, dtype=torch.float64)
        scale[0] = scale[-1] = 1.0 / n_fft
        basis = torch.cat([scale * torch.cos(angle), -scale * torch.sin(angle)]) * window
        self.register_buffer("basis", basis.unsqueeze(1).float(), persistent=False)  # [2 * n_bins, 1, n_fft]
        self.register_buffer("window_sq", window.square().view(1, 1, n_fft).float(), persistent=False)

    def forward(
        self, real: torch.Tensor, imag: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        spec = torch.cat([real, imag], dim=1)
        frames = F.conv_transpose1d(spec, self.basis, stride=self.hop_length)
        if frame_mask is None:
            frame_mask = torch.ones_like(real[:1, :1, :])
        envelope = F.conv_transpose1d(frame_mask, self.window_sq, stride=self.hop_length)
        # Past a masked item's last frame the envelope is 0; the clamp keeps those (discarded) samples finite.
        wave = frames / envelope.clamp(min=1e-11)
        return wave[:, 0, self.pad : -self.pad]

    def samples(self, frames: int) -> int:
        """Output samples of `frames` frames."""
        return vocoder_samples(frames, self.hop_length)


# --------------------------------------------------------------------------------------------
# Decoder


class VocosDecoder(nn.Module):
    """mel [b, 100, frames] (+ optional lengths [b]) -> wave [b, (frames - 1) * 256], equal to `Vocos.decode`.

    Without `lengths` the whole tensor is decoded, as Vocos does. With `lengths`, frames past an
    item's length are zeroed before every convolution (Vocos' only cross-frame operations, whose
    zero padding they then reproduce) and left out of the ISTFT, so each item's first
    (lengths[i] - 1) * 256 samples equal decoding that item alone.
    """

    def __init__(self, vocos: Vocos):
        super().__init__()
        if not isinstance(vocos.backbone, VocosBackbone) or vocos.backbone.adanorm:
            raise CheckpointError("VocosDecoder needs a VocosBackbone without adanorm (mel Vocos)")
        if not isinstance(vocos.head, ISTFTHead) or vocos.head.istft.padding != "center":
            raise CheckpointError("VocosDecoder needs an ISTFTHead with padding 'center' (mel Vocos)")
        self.backbone = vocos.backbone
        self.out = vocos.head.out
        self.istft = ISTFT(n_fft=vocos.head.istft.n_fft, hop_length=vocos.head.istft.hop_length)

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        mask = None
        if lengths is not None:
            positions = torch.arange(mel.shape[-1], device=mel.device)
            mask = (positions[None, :] < lengths.to(mel.device)[:, None]).to(mel.dtype).unsqueeze(1)
            mel = mel * mask

        bb = self.backbone
        x = bb.embed(mel)
        x = bb.norm(x.transpose(1, 2)).transpose(1, 2)
        for block in bb.convnext:
            if mask is not None:
                x = x * mask
            x = block(x)
        x = bb.final_layer_norm(x.transpose(1, 2))

        x = self.out(x).transpose(1, 2)
        n_bins = x.shape[1] // 2  # slices, not chunk(): chunk becomes an opset-18 Split in dynamo exports
        mag, phase = x[:, :n_bins], x[:, n_bins:]
        mag = torch.exp(mag).clip(max=1e2)  # as vocos' ISTFTHead
        real, imag = mag * torch.cos(phase), mag * torch.sin(phase)
        if mask is None:
            return self.istft(real, imag)

        wave = self.istft(real * mask, imag * mask, mask)
        # Past an item's end only the tails of its last windows remain, divided by a tiny envelope.
        # Sample s is valid while s < (length - 1) * hop, written without a subtraction that could go negative.
        hop = self.istft.hop_length
        samples = torch.arange(wave.shape[-1], device=wave.device)
        valid = samples[None, :] + hop < lengths.to(wave.device)[:, None] * hop
        return torch.where(valid, wave, torch.zeros_like(wave))  # where, not *: 0/0 is NaN in fp16


@torch.inference_mode()
def decode_batch(decoder: VocosDecoder, mels: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Decode mels [100, frames_i] in one call; return each item's (frames_i - 1) * 256 samples (float32).

    Items are zero-padded to the longest and decoded with their lengths, so each result is the same
    as decoding that mel alone (up to float rounding, ~1e-6).
    """
    if not mels:
        return []
    param = next(decoder.parameters())
    lengths = [int(m.shape[-1]) for m in mels]
    batch = torch.zeros(len(mels), mels[0].shape[0], max(lengths), dtype=param.dtype, device=param.device)
    for i, mel in enumerate(mels):
        batch[i, :, : lengths[i]] = mel
    waves = decoder(batch, torch.tensor(lengths, device=param.device))
    return [waves[i, : decoder.istft.samples(n)].float().cpu().numpy() for i, n in enumerate(lengths)]
