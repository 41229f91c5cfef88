"""Official F5-TTS checkpoints: read them as published, and write random ones in the same layout.

Layouts we read (as SWivid/F5-TTS publishes them):
  * `model_*.safetensors`: EMA weights, keys `ema_model.transformer.*`
  * `model_*.pt`: {"ema_model_state_dict": {"ema_model.transformer.*", "initted", "step", ...}}
    or a plain {"model_state_dict": {"transformer.*"}} from training
  * `vocab.txt` beside the checkpoint; Vocos as a folder with `config.yaml` + `pytorch_model.bin`
  * optionally `model.yaml` beside the checkpoint, in the layout of upstream's `configs/*.yaml`
"""

from __future__ import annotations

import logging
import os
import shutil
import string
from pathlib import Path

import torch
import yaml

from f5_triton.config import ARCHITECTURES, HOP_LENGTH, N_FFT, N_MELS, SAMPLE_RATE, WIN_LENGTH, DiTConfig
from f5_triton.errors import CheckpointError
from f5_triton.model import DiT

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")

logger = logging.getLogger(__name__)


def read_raw_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (download one with f5-triton build checkpoint "
                              f"--model NAME --ckpt-dir ckpts, or scripts/make_random_checkpoint.py for a random one)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or truncated files raise many different types
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def transformer_state_dict(raw: dict) -> dict[str, torch.Tensor]:
    """The DiT weights from any published layout, with upstream's `transformer.` prefix removed."""
    if "ema_model_state_dict" in raw:
        raw = raw["ema_model_state_dict"]
    elif "model_state_dict" in raw:
        raw = raw["model_state_dict"]
    weights = {}
    for key, value in raw.items():
        if key.startswith("ema_model."):
            key = key[len("ema_model."):]
        if key.startswith("transformer.") and torch.is_tensor(value):
            weights[key[len("transformer."):]] = value
    if not weights:
        sample = ", ".join(list(raw)[:5])
        raise CheckpointError(f"no `transformer.*` weights in checkpoint (keys start with: {sample})")
    return weights


def read_model_yaml(path: str | os.PathLike) -> DiTConfig | None:
    """Architecture from a `model.yaml` (upstream configs layout) beside the checkpoint, if any."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        doc = yaml.safe_load(path.read_text())
        model = doc.get("model", doc)
        arch = model["arch"]
        if model.get("backbone", "DiT") != "DiT":
            raise CheckpointError(f"{path}: only the DiT backbone is supported, got {model.get('backbone')}")
        return DiTConfig.from_arch(arch)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"cannot parse architecture from {path}: {exc}") from exc


def is_random_checkpoint(ckpt_path: str | os.PathLike) -> bool:
    """Whether `make_random_checkpoint` wrote this checkpoint (its model.yaml says so): its audio is noise."""
    path = Path(ckpt_path).parent / "model.yaml"
    try:
        doc = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(doc, dict) and bool((doc.get("model") or {}).get("random_weights", False))


def resolve_architecture(ckpt_path: str | os.PathLike, arch: DiTConfig | str | None = None) -> DiTConfig:
    """Explicit config or name > `model.yaml` beside the checkpoint > name of the checkpoint's folder."""
    if isinstance(arch, DiTConfig):
        return arch
    if isinstance(arch, str):
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
        return ARCHITECTURES[arch]
    ckpt_path = Path(ckpt_path)
    from_yaml = read_model_yaml(ckpt_path.parent / "model.yaml")
    if from_yaml is not None:
        return from_yaml
    if ckpt_path.parent.name in ARCHITECTURES:
        return ARCHITECTURES[ckpt_path.parent.name]
    raise CheckpointError(
        f"cannot tell the architecture of {ckpt_path}: put it in a folder named after the model "
        f"({', '.join(ARCHITECTURES)}), add a model.yaml beside it, or pass the architecture name")


def load_dit(ckpt_path: str | os.PathLike, vocab_size: int, arch: DiTConfig | str | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> DiT:
    """Build the DiT for `ckpt_path`, load its weights strictly and optimize it for `device` and `dtype`
    (`DiT.optimize_for`)."""
    config = resolve_architecture(ckpt_path, arch).replace(text_num_embeds=vocab_size)
    weights = transformer_state_dict(read_raw_state_dict(ckpt_path))
    table = weights.get("text_embed.text_embed.weight")
    if table is not None and table.shape[0] != vocab_size + 1:
        raise CheckpointError(
            f"vocab has {vocab_size} tokens but checkpoint {ckpt_path} was trained with {table.shape[0] - 1}: "
            f"use the vocab.txt published with this checkpoint")
    model = DiT.from_config(config)
    try:
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {ckpt_path} does not match architecture {config}: {exc}") from exc
    model.optimize_for(device, dtype)
    logger.info("DiT %s on %s in %s: %s", ckpt_path, device, dtype, model.kernels)
    return model


def find_checkpoint(folder: str | os.PathLike) -> Path:
    """The newest `model_*.{safetensors,pt}` (or `model.*`) in a folder, by version-aware sort."""
    folder = Path(folder)
    candidates = [p for p in folder.glob("model*") if p.suffix in CHECKPOINT_SUFFIXES]
    if not candidates:
        raise CheckpointError(f"no model_*.safetensors or model_*.pt in {folder}")

    def step(p: Path) -> tuple[int, str]:
        digits = "".join(c for c in p.stem if c.isdigit())
        return (int(digits) if digits else -1, p.name)

    return max(candidates, key=step)


# ---------------------------------------------------------------------------------------------
# Random checkpoints in the official layout, for tests and demos.

def small_vocab() -> list[str]:
    """A 256-token vocab: space first (id 0 = unknown), ASCII, then pinyin-like syllables."""
    tokens = [" "] + [c for c in string.printable[:95] if c != " "]
    initials = ["", "b", "p", "m", "f", "d", "t", "n", "l", "g", "k", "h", "j", "q", "x", "zh", "ch", "sh", "z", "s"]
    finals = ["a", "o", "e", "i", "u", "ai", "ei", "ao", "ou", "an", "en", "ang", "eng", "ong"]
    for final in finals:
        for initial in initials:
            for tone in "1234":
                if len(tokens) < 256:
                    tokens.append(f"{initial}{final}{tone}")
    return tokens


def random_dit(config: DiTConfig, seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("gamma", "beta")):  # GRN starts at zero; make it do something
                param.normal_(0, 0.1)
    return model.eval()


def model_yaml(name: str, config: DiTConfig) -> dict:
    return {"model": {
        "name": name,
        "tokenizer": "custom",
        "tokenizer_path": "vocab.txt",
        "backbone": "DiT",
        "arch": config.arch_dict(),
        "mel_spec": {"target_sample_rate": SAMPLE_RATE, "n_mel_channels": N_MELS, "hop_length": HOP_LENGTH,
                     "win_length": WIN_LENGTH, "n_fft": N_FFT, "mel_spec_type": "vocos"},
        "vocoder": {"is_local": True, "local_path": "vocos"},
    }}


def write_checkpoint(model: DiT, path: str | os.PathLike, dtype: torch.dtype = torch.float32, step: int = 0) -> None:
    """Save in the official EMA layout (safetensors or .pt, chosen by the file suffix)."""
    path = Path(path)
    weights = {f"ema_model.transformer.{k}": v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(path))
    else:
        weights["initted"] = torch.tensor(True)
        weights["step"] = torch.tensor(step)
        torch.save({"ema_model_state_dict": weights}, str(path))


def write_vocab(tokens: list[str], path: str | os.PathLike) -> None:
    Path(path).write_text("".join(t + "\n" for t in tokens), encoding="utf-8")


def make_random_checkpoint(output: str | os.PathLike, name: str = "tiny", vocab_path: str | None = None,
                           seed: int = 0, fmt: str = "safetensors", dtype: torch.dtype = torch.float32,
                           vocoder_small: bool | None = None) -> Path:
    """Write DIR/model.<fmt>, DIR/model.yaml, DIR/vocab.txt and DIR/vocos/, all loadable as official."""
    from f5_triton.text import Tokenizer
    from f5_triton.vocoder import make_random_vocos

    if name not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if vocab_path:  # copied byte for byte: official vocabs have CRLF endings
        shutil.copyfile(vocab_path, output / "vocab.txt")
    else:
        write_vocab(small_vocab(), output / "vocab.txt")
    config = ARCHITECTURES[name].replace(text_num_embeds=Tokenizer(output / "vocab.txt").vocab_size)
    doc = model_yaml(name, config)
    doc["model"]["random_weights"] = True  # clients and logs warn that the output is noise (is_random_checkpoint)
    (output / "model.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    write_checkpoint(random_dit(config, seed), output / f"model.{fmt}", dtype=dtype)
    make_random_vocos(output / "vocos", seed=seed, small=(name == "tiny") if vocoder_small is None else vocoder_small)
    return output


# ---------------------------------------------------------------------------------------------
# Official weights from the Hugging Face hub.

HUB_REPO = "SWivid/F5-TTS"
VOCOS_REPO = "charactr/vocos-mel-24khz"


def download_official(name: str, output: str | os.PathLike) -> dict[str, Path]:
    """Fetch `name`'s newest checkpoint + vocab and Vocos into `output` (idempotent).

    Raises RuntimeError with what to do when the hub cannot be reached.
    """
    from huggingface_hub import hf_hub_download, list_repo_files

    output = Path(output)
    try:
        files = [f for f in list_repo_files(HUB_REPO) if f.startswith(f"{name}/")]
        weights = sorted((f for f in files if Path(f).name.startswith("model_") and Path(f).suffix in CHECKPOINT_SUFFIXES),
                         key=lambda f: int("".join(c for c in Path(f).stem if c.isdigit()) or -1))
        if not weights:
            raise LookupError(f"{HUB_REPO} has no checkpoint for {name}")
        # prefer safetensors of the newest step
        newest = max(weights, key=lambda f: (int("".join(c for c in Path(f).stem if c.isdigit()) or -1),
                                             f.endswith(".safetensors")))
        ckpt = hf_hub_download(HUB_REPO, newest, local_dir=output)
        vocab = hf_hub_download(HUB_REPO, f"{name}/vocab.txt", local_dir=output)
        vocos_dir = output / "vocos-mel-24khz"
        for filename in ("config.yaml", "pytorch_model.bin"):
            hf_hub_download(VOCOS_REPO, filename, local_dir=vocos_dir)
    except Exception as exc:  # offline, DNS, HTTP and hub errors all come here
        raise RuntimeError(
            f"cannot download from the Hugging Face hub ({type(exc).__name__}: {exc}). Without network, copy "
            f"{name}/model_*.safetensors and vocab.txt from {HUB_REPO} into {output / name}/ and "
            f"config.yaml + pytorch_model.bin from {VOCOS_REPO} into {output / 'vocos-mel-24khz'}/, "
            f"or use scripts/make_random_checkpoint.py for a random-weight demo") from exc
    return {"checkpoint": Path(ckpt), "vocab": Path(vocab), "vocoder": vocos_dir}
