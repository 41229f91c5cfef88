"""Shared fixtures: paths to ../shared/data, and tiny random checkpoints made by the project."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/upstream.py


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} not present (tests read ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def official_vocab() -> Path:
    return shared_file("vocab.txt")


@pytest.fixture(scope="session")
def ref_en() -> Path:
    return shared_file("basic_ref_en.wav")


@pytest.fixture(scope="session")
def ref_zh() -> Path:
    return shared_file("basic_ref_zh.wav")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random checkpoint folder in the official layout (model.safetensors, vocab, vocos/)."""
    from f5_triton.checkpoints import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), "tiny", seed=0)
