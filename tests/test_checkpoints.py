"""Official checkpoint layouts load strictly; random checkpoints are written in the same layout."""

import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from f5_triton.checkpoints import (
    find_checkpoint, load_dit, random_dit, read_raw_state_dict, resolve_architecture,
    transformer_state_dict, write_checkpoint)
from f5_triton.config import ARCHITECTURES
from f5_triton.errors import CheckpointError
from f5_triton.text import Tokenizer
from f5_triton.vocoder import load_vocos

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ARCHITECTURES["tiny"]


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_official_ema_layouts_load_strict(tmp_path, suffix, dtype):
    model = random_dit(TINY, seed=1)
    path = tmp_path / f"model_1200{suffix}"
    write_checkpoint(model, path, dtype=dtype)
    raw = read_raw_state_dict(path)
    if suffix == ".pt":
        assert set(raw) == {"ema_model_state_dict"}
        assert {"initted", "step"} <= set(raw["ema_model_state_dict"])
    else:
        assert all(k.startswith("ema_model.transformer.") for k in raw)
    loaded = load_dit(path, 256, arch="tiny")
    expected = model.half().float() if dtype == torch.float16 else model
    assert same_weights(loaded, expected)


def test_plain_training_state_dict_and_mel_spec_keys(tmp_path):
    model = random_dit(TINY, seed=2)
    weights = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    weights["mel_spec.mel_stft.mel_scale.fb"] = torch.zeros(3)  # dropped, as upstream does
    torch.save({"model_state_dict": weights, "step": 7}, tmp_path / "model_7.pt")
    assert same_weights(load_dit(tmp_path / "model_7.pt", 256, arch="tiny"), model)


def test_upstream_cfm_loads_our_random_checkpoint(tiny_ckpt):
    """Our random files are in the official layout: upstream's own loading recipe accepts them."""
    import upstream

    dit = upstream.load("model.backbones.dit")
    cfm = upstream.load("model.cfm")
    arch = yaml.safe_load((tiny_ckpt / "model.yaml").read_text())["model"]["arch"]
    vocab_size = Tokenizer(tiny_ckpt / "vocab.txt").vocab_size
    model = cfm.CFM(transformer=dit.DiT(**arch, text_num_embeds=vocab_size, mel_dim=100))
    checkpoint = {"ema_model_state_dict": load_file(str(tiny_ckpt / "model.safetensors"))}
    state = {k.replace("ema_model.", ""): v for k, v in checkpoint["ema_model_state_dict"].items()
             if k not in ["initted", "step"]}
    model.load_state_dict(state)  # strict, as upstream load_checkpoint does


def test_architecture_resolution(tmp_path, tiny_ckpt):
    assert resolve_architecture(tiny_ckpt / "model.safetensors").replace(text_num_embeds=256) == TINY
    assert resolve_architecture("x/F5TTS_Base/model_1200000.pt") == ARCHITECTURES["F5TTS_Base"]
    assert resolve_architecture("anything", "F5TTS_v1_Small").dim == 768
    with pytest.raises(CheckpointError, match="cannot tell the architecture"):
        resolve_architecture(tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="unknown architecture"):
        resolve_architecture(tmp_path / "model.pt", "F5TTS_Huge")


def test_errors_are_clear(tmp_path, tiny_ckpt):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_dit(tmp_path / "nope.safetensors", 256, arch="tiny")
    corrupt = tmp_path / "model_1.safetensors"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_dit(corrupt, 256, arch="tiny")
    with pytest.raises(CheckpointError, match="vocab has 300 tokens but checkpoint .* trained with 256"):
        load_dit(tiny_ckpt / "model.safetensors", 300)
    save_file({"ema_model.something.else": torch.zeros(1)}, str(tmp_path / "model_2.safetensors"))
    with pytest.raises(CheckpointError, match="no `transformer"):
        load_dit(tmp_path / "model_2.safetensors", 256, arch="tiny")
    with pytest.raises(CheckpointError, match="does not match architecture"):
        load_dit(tiny_ckpt / "model.safetensors", 256, arch=TINY.replace(depth=3))


def test_find_checkpoint_takes_newest(tmp_path):
    for name in ("model_1200000.pt", "model_1250000.safetensors", "model_950000.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert find_checkpoint(tmp_path).name == "model_1250000.safetensors"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model_"):
        find_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_make_random_checkpoint_script_with_official_vocab(tmp_path, official_vocab, fmt):
    out = tmp_path / "ckpt"
    subprocess.run([sys.executable, os.path.join(REPO, "scripts", "make_random_checkpoint.py"), "--config", "tiny",
                    "--output", str(out), "--vocab", str(official_vocab), "--format", fmt], check=True)
    assert (out / "vocab.txt").read_bytes() == official_vocab.read_bytes()
    tokenizer = Tokenizer(out / "vocab.txt")
    model = load_dit(out / f"model.{fmt}", tokenizer.vocab_size)  # arch from model.yaml
    assert model.text_embed.text_embed.weight.shape[0] == tokenizer.vocab_size + 1 == 2546
    load_vocos(out / "vocos")


@pytest.mark.parametrize("name", ["F5TTS_v1_Base", "F5TTS_Base", "F5TTS_v1_Small", "F5TTS_Small"])
def test_released_configs_roundtrip_metadata(tmp_path, name):
    """The model.yaml we write for each released config reads back as that config."""
    from f5_triton.checkpoints import model_yaml

    (tmp_path / "model.yaml").write_text(yaml.safe_dump(model_yaml(name, ARCHITECTURES[name])))
    assert resolve_architecture(tmp_path / "model.safetensors") == ARCHITECTURES[name]


def test_download_reports_offline_clearly(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "f5_triton.cli", "build", "checkpoint", "--model", "F5TTS_v1_Base",
                             "--ckpt-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0
    assert "cannot download from the Hugging Face hub" in result.stderr
    assert "make_random_checkpoint.py" in result.stderr


def test_transformer_state_dict_strips_prefixes():
    raw = {"ema_model_state_dict": {"initted": torch.tensor(True), "step": torch.tensor(3),
                                    "ema_model.transformer.proj_out.bias": torch.ones(2),
                                    "ema_model.mel_spec.dummy": torch.zeros(1)}}
    assert list(transformer_state_dict(raw)) == ["proj_out.bias"]
