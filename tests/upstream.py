"""Import upstream F5-TTS (pinned f5-tts==1.1.22, installed with --no-deps) for parity tests.

`f5_tts/model/__init__.py` imports the trainer (accelerate, wandb, datasets, ...); we only need the
model, sampler and tokenizer modules, so the packages are registered without running their
`__init__` and the modules are imported one by one. `load_infer()` adds upstream's inference path
(`f5_tts.infer.utils_infer`: `preprocess_ref_audio_text`, `infer_process`, `load_model`, ...).

Without upstream the tests skip, except in CI (CI=true), where a missing upstream is a failure:
the parity tests are the only check of the whole synthesis against upstream's own code.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
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
        missing = "upstream f5-tts is not installed (pip install --no-deps f5-tts==1.1.22)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{missing}; CI must run the upstream parity tests")
        pytest.skip(missing)
    return list(spec.submodule_search_locations)[0]


def load(module_name: str):
    """Import `f5_tts.<module_name>` (e.g. "model.backbones.dit"), skipping the test if absent."""
    root = package_root()
    _stub_librosa_if_missing()
    _register_package("f5_tts", root)
    _register_package("f5_tts.model", f"{root}/model")
    _register_package("f5_tts.model.backbones", f"{root}/model/backbones")
    _register_package("f5_tts.infer", f"{root}/infer")
    with _flash_attn_hidden_unless_flash_attn_2():
        return importlib.import_module(f"f5_tts.{module_name}")


@contextlib.contextmanager
def _flash_attn_hidden_unless_flash_attn_2():
    """Upstream's modules.py imports flash-attn 2 (`from flash_attn import flash_attn_func`) whenever
    `importlib.util.find_spec("flash_attn")` finds anything. FlashAttention-4 (our `fa4` extra) installs
    `flash_attn.cute` with no `flash_attn/__init__.py`: a namespace package, which find_spec finds too, and the
    import fails. While upstream's modules import, such a namespace `flash_attn` is hidden (a None in sys.modules
    makes find_spec answer None), then put back as it was, so our own code keeps FA4. Upstream runs its torch
    attention either way (`attn_backend="torch"`, its default); a real flash-attn 2 is left visible."""
    spec = importlib.util.find_spec("flash_attn") if sys.modules.get("flash_attn", True) is not None else None
    if spec is None or spec.origin is not None:  # absent, or flash-attn 2's regular package
        yield
        return
    saved = sys.modules.get("flash_attn", _ABSENT)
    sys.modules["flash_attn"] = None
    try:
        yield
    finally:
        if saved is _ABSENT:
            del sys.modules["flash_attn"]
        else:
            sys.modules["flash_attn"] = saved


_ABSENT = object()


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


def load_infer():
    """upstream's `f5_tts.infer.utils_infer`, importable without its package `__init__`s.

    utils_infer does `from f5_tts.model import CFM`: the registered (empty) `f5_tts.model` gets CFM and
    DiT from their own modules. torchaudio >= 2.9 reads files only through torchcodec; where that is
    missing, the module's `torchaudio` is a stand-in whose `load` reads with soundfile (the same float32
    [channels, samples] that torchaudio returns for PCM wav) and whose `transforms` are torchaudio's.
    """
    if "f5_tts.infer.utils_infer" in sys.modules:
        return sys.modules["f5_tts.infer.utils_infer"]
    cfm, dit = load("model.cfm"), load("model.backbones.dit")
    model = sys.modules["f5_tts.model"]
    model.CFM, model.DiT = cfm.CFM, dit.DiT
    utils_infer = load("infer.utils_infer")
    if importlib.util.find_spec("torchcodec") is None:
        utils_infer.torchaudio = types.SimpleNamespace(load=_load_with_soundfile,
                                                       transforms=utils_infer.torchaudio.transforms)
    return utils_infer


def _load_with_soundfile(path):
    import soundfile
    import torch

    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return torch.from_numpy(samples.T.copy()), rate
