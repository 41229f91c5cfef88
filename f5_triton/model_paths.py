"""Where one model's files are: the checkpoint, its vocab and the Vocos folder, from a checkpoint folder or
from `--ckpt-dir` / `--ckpt` / `--vocab` / `--vocoder` arguments. Light to import (no torch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from f5_triton.errors import InvalidInputError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt-dir", help="folder with model.* + vocab.txt + vocos/ (as make_random_checkpoint writes)")
    group.add_argument("--ckpt", help="checkpoint file (model_*.safetensors or .pt)")
    group.add_argument("--vocab", help="vocab.txt of the checkpoint")
    group.add_argument("--vocoder", help="Vocos folder (config.yaml + pytorch_model.bin)")
    group.add_argument("--arch", help="architecture name when no model.yaml is beside the checkpoint")


def vocoder_candidates(ckpt_dir: Path) -> list[Path]:
    """Where a checkpoint folder's Vocos may be, in order: inside it, beside it (the hub layout), inside it again."""
    return [ckpt_dir / "vocos", ckpt_dir.parent / "vocos-mel-24khz", ckpt_dir / "vocos-mel-24khz"]


def find_vocoder(ckpt_dir: Path) -> Path | None:
    """The first of :func:`vocoder_candidates` that is a folder, or None."""
    return next((c for c in vocoder_candidates(ckpt_dir) if c.is_dir()), None)


def resolve_model_paths(args) -> tuple[Path, Path, Path]:
    """--ckpt/--vocab/--vocoder, each defaulting to its place inside --ckpt-dir."""
    from f5_triton.checkpoints import find_checkpoint

    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else None
    if ckpt_dir is None and not (args.ckpt and args.vocab and args.vocoder):
        raise InvalidInputError("--ckpt-dir", "give --ckpt-dir, or all of --ckpt, --vocab and --vocoder")
    if ckpt_dir is not None and not ckpt_dir.is_dir():
        raise InvalidInputError("--ckpt-dir", f"{ckpt_dir} is not a folder")
    ckpt = Path(args.ckpt) if args.ckpt else find_checkpoint(ckpt_dir)
    vocab = Path(args.vocab) if args.vocab else ckpt.parent / "vocab.txt"
    vocoder = Path(args.vocoder) if args.vocoder else find_vocoder(ckpt_dir) or vocoder_candidates(ckpt_dir)[0]
    return ckpt, vocab, vocoder
