"""Import upstream F5-TTS (pinned f5-tts==1.1.22, installed with --no-deps) for parity tests.

`f5_tts/model/__init__.py` imports the trainer (accelerate, wandb, datasets, ...); we only need the
model, sampler and tokenizer modules, so the packages are registered without running their
`__init__` and the modules are imported one by one.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest


def _register_package(name: str, path: str) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__path__ = [path]
        sys.modules[name] = module


def package_root() -> str:
    """Folder of the installed upstream `f5_tts` package (the test is skipped if it is absent)."""
    if "f5_tts" in sys.modules:
        return sys.modules["f5_tts"].__path__[0]
    spec = importlib.util.find_spec("f5_tts")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("upstream f5-tts is not installed (pip install --no-deps f5-tts==1.1.22)")
    return list(spec.submodule_search_locations)[0]


def load(module_name: str):
    """Import `f5_tts.<module_name>` (e.g. "model.backbones.dit"), skipping the test if absent."""
    root = package_root()
    _stub_librosa_if_missing()
    _register_package("f5_tts", root)
    _register_package("f5_tts.model", f"{root}/model")
    _register_package("f5_tts.model.backbones", f"{root}/model/backbones")
    _register_package("f5_tts.infer", f"{root}/infer")
    return importlib.import_module(f"f5_tts.{module_name}")


def _stub_librosa_if_missing() -> None:
    """upstream's modules.py imports librosa only for the BigVGAN mel, which we never use; the GPU
    image has no librosa, so a stand-in that refuses to be called keeps the import working there."""
    if "librosa" in sys.modules or importlib.util.find_spec("librosa") is not None:
        return

    def mel(*args, **kwargs):
        raise RuntimeError("librosa is not installed (only upstream's BigVGAN mel needs it)")

    librosa = types.ModuleType("librosa")
    filters = types.ModuleType("librosa.filters")
    filters.mel = mel
    librosa.filters = filters
    sys.modules["librosa"], sys.modules["librosa.filters"] = librosa, filters
