"""f5_triton.vocoder: loading, ISTFT / VocosDecoder parity with vocos, batching, ONNX export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from vocos import Vocos
from vocos.spectral_ops import ISTFT as VocosISTFT

from f5_triton.audio import MelSpectrogram, read_audio
from f5_triton.config import vocoder_samples
from f5_triton.engines.base import VOCODER
from f5_triton.errors import CheckpointError
from f5_triton.vocoder import (
    ISTFT,
    VocosDecoder,
    decode_batch,
    load_vocos,
    make_random_vocos,
    vocos_config,
)

from conftest import shared_file

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def vocos_dir(tmp_path_factory) -> Path:
    return make_random_vocos(tmp_path_factory.mktemp("vocos"), seed=0, small=True)


@pytest.fixture(scope="module")
def vocos(vocos_dir):
    return load_vocos(vocos_dir)


@pytest.fixture(scope="module")
def decoder(vocos) -> VocosDecoder:
    return VocosDecoder(vocos).eval()


def speech_mel(frames: int | None = None) -> torch.Tensor:
    """[1, 100, frames] log-mel of real speech if the shared data is present, else a random one."""
    path = DATA / "basic_ref_en.wav"
    if path.is_file():
        wave, _ = read_audio(path)
        mel = MelSpectrogram()(torch.from_numpy(wave)[None])
    else:
        mel = torch.randn(1, 100, 500, generator=torch.Generator().manual_seed(0)) - 5
    return mel if frames is None else mel[..., :frames]


def random_mel(batch: int, frames: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 100, frames, generator=torch.Generator().manual_seed(seed)) * 2 - 5


# --------------------------------------------------------------------------------------------
# ISTFT and decoder parity


@pytest.mark.parametrize("frames", [2, 3, 7, 300])
def test_istft_equals_vocos_istft(frames):
    gen = torch.Generator().manual_seed(frames)
    mag = torch.exp(torch.randn(2, 513, frames, generator=gen) * 2).clip(max=1e2)  # up to the head's clip
    phase = torch.rand(2, 513, frames, generator=gen) * 2 * torch.pi
    vocos_istft = VocosISTFT(n_fft=1024, hop_length=256, win_length=1024, padding="center")  # torch.istft
    expected = vocos_istft(torch.polar(mag, phase))
    ours = ISTFT(n_fft=1024, hop_length=256)(mag * torch.cos(phase), mag * torch.sin(phase))
    assert ours.shape == expected.shape == (2, (frames - 1) * 256)
    assert (ours - expected).abs().max().item() < 1e-5  # measured ~6e-7 on signals of peak ~2


def test_one_frame_gives_no_samples():
    """torch.istft refuses a single centred frame (all of it is trimmed); ours returns 0 samples."""
    real = torch.randn(1, 513, 1)
    assert ISTFT()(real, torch.zeros_like(real)).shape == (1, 0)
    assert vocoder_samples(1) == VOCODER.samples(1) == 0


@pytest.mark.parametrize("frames", [0, 1, 2, 50])
def test_output_lengths_agree(frames):
    """The length rule, in its three places: config (pipeline, postprocess), ISTFT, the engines' spec."""
    expected = max(frames - 1, 0) * 256
    assert vocoder_samples(frames) == ISTFT().samples(frames) == VOCODER.samples(frames) == expected
    assert VOCODER.samples(torch.tensor([frames])).tolist() == [expected]


def test_decoder_equals_vocos_decode_on_speech(vocos, decoder):
    mel = speech_mel()
    with torch.inference_mode():
        expected = vocos.decode(mel)
        ours = decoder(mel)
        ours_with_lengths = decoder(mel, torch.tensor([mel.shape[-1]]))
    assert ours.shape == expected.shape == (1, (mel.shape[-1] - 1) * 256)
    assert (ours - expected).abs().max().item() < 1e-5
    assert (ours_with_lengths - expected).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def published_vocos_dir(tmp_path_factory) -> Path:
    """A Vocos folder as users download it: the published config.yaml itself (byte for byte) and
    random weights of its shape (vocos' own init, made from that config)."""
    published = shared_file("vocos-mel-24khz/config.yaml")
    folder = tmp_path_factory.mktemp("published_vocos")
    (folder / "config.yaml").write_bytes(published.read_bytes())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        weights = Vocos.from_hparams(str(published)).state_dict()
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def test_published_config_loads_and_decodes_as_vocos(published_vocos_dir):
    vocos = load_vocos(published_vocos_dir)
    assert vocos.head.istft.padding == "center" and vocos.backbone.convnext[0].dwconv.in_channels == 512
    decoder = VocosDecoder(vocos).eval()
    mel = speech_mel(120)
    with torch.inference_mode():
        expected = vocos.decode(mel)
        ours = decoder(mel)
    assert ours.shape == expected.shape == (1, 119 * 256)
    assert (ours - expected).abs().max().item() < 1e-5


def test_published_config_decodes_batches_as_vocos(published_vocos_dir):
    vocos = load_vocos(published_vocos_dir)
    mels = [speech_mel(n)[0] for n in (90, 2, 37)] + [random_mel(1, 64, seed=3)[0]]
    waves = decode_batch(VocosDecoder(vocos).eval(), mels)
    for mel, wave in zip(mels, waves):
        with torch.inference_mode():
            alone = vocos.decode(mel[None])[0].numpy()
        assert wave.shape == alone.shape == ((mel.shape[-1] - 1) * 256,)
        assert np.abs(wave - alone).max() < 1e-5


def test_random_vocos_writes_the_published_config(tmp_path):
    """make_random_vocos(small=False) writes what charactr/vocos-mel-24khz publishes; small only shrinks sizes."""
    published = yaml.safe_load(shared_file("vocos-mel-24khz/config.yaml").read_text())
    full = yaml.safe_load((make_random_vocos(tmp_path / "full", seed=1, small=False) / "config.yaml").read_text())
    assert full == vocos_config(small=False) == published
    small = yaml.safe_load((make_random_vocos(tmp_path / "small", seed=1) / "config.yaml").read_text())
    sizes = {("backbone", "dim"), ("backbone", "intermediate_dim"), ("backbone", "num_layers"), ("head", "dim")}
    for part, args in published.items():
        assert small[part]["class_path"] == args["class_path"]
        differing = {key for key, value in args["init_args"].items() if small[part]["init_args"][key] != value}
        assert differing == {key for p, key in sizes if p == part}, part
    assert small["head"]["init_args"]["dim"] == small["backbone"]["init_args"]["dim"]


def test_full_size_random_vocos_loads_and_decodes(tmp_path):
    folder = make_random_vocos(tmp_path, seed=1, small=False)
    config = yaml.safe_load((folder / "config.yaml").read_text())
    backbone = {"input_channels": 100, "dim": 512, "intermediate_dim": 1536, "num_layers": 8}
    assert config["backbone"]["init_args"] == backbone
    assert config["head"]["init_args"] == {"dim": 512, "n_fft": 1024, "hop_length": 256, "padding": "center"}
    vocos = load_vocos(folder)
    mel = speech_mel(64)
    with torch.inference_mode():
        assert (VocosDecoder(vocos)(mel) - vocos.decode(mel)).abs().max().item() < 1e-5


def test_random_vocos_is_deterministic(tmp_path):
    a = torch.load(make_random_vocos(tmp_path / "a", seed=3) / "pytorch_model.bin")
    b = torch.load(make_random_vocos(tmp_path / "b", seed=3) / "pytorch_model.bin")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------
# Batching


def test_decode_batch_equals_decoding_alone(vocos, decoder):
    mels = [random_mel(1, n, seed=n)[0] for n in (13, 200, 80, 2)]
    waves = decode_batch(decoder, mels)
    for mel, wave in zip(mels, waves):
        with torch.inference_mode():
            alone = vocos.decode(mel[None])[0].numpy()
        assert wave.shape == alone.shape == ((mel.shape[-1] - 1) * 256,)
        assert np.abs(wave - alone).max() < 1e-5  # measured ~1e-7: padding does not reach the item


def test_padding_without_lengths_would_leak(vocos, decoder):
    """Why decode_batch passes lengths: zero-padded frames change the last ~1k samples of an item
    through the convolutions and the ISTFT overlap (~0.04 here, peak ~0.1; more with 8 layers)."""
    short, long = random_mel(1, 80, seed=1), random_mel(1, 200, seed=2)
    batch = torch.zeros(2, 100, 200)
    batch[0, :, :80], batch[1] = short[0], long[0]
    with torch.inference_mode():
        alone = vocos.decode(short)[0]
        unmasked = decoder(batch)[0, : 79 * 256]
        masked = decoder(batch, torch.tensor([80, 200]))
    assert (unmasked - alone).abs().max().item() > 1e-3
    assert (masked[0, : 79 * 256] - alone).abs().max().item() < 1e-5
    assert masked[0, 79 * 256 :].abs().max().item() == 0.0  # nothing past an item's end


# --------------------------------------------------------------------------------------------
# ONNX


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["mel", "mel+lengths"])
def test_onnx_export_matches_torch(tmp_path, decoder, dynamo, with_lengths):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    example = (random_mel(2, 50, seed=0), torch.tensor([50, 31]))[: 2 if with_lengths else 1]
    names = ["mel", "lengths"][: len(example)]
    path = tmp_path / "vocoder.onnx"
    if dynamo:
        batch, frames = torch.export.Dim("batch"), torch.export.Dim("frames")
        shapes = ({0: batch, 2: frames}, {0: batch})[: len(example)]
        kwargs = {"dynamic_shapes": shapes}
    else:
        axes = {"mel": {0: "batch", 2: "frames"}, "lengths": {0: "batch"}, "wave": {0: "batch", 1: "samples"}}
        kwargs = {"dynamic_axes": {k: v for k, v in axes.items() if k in names or k == "wave"}}
    with torch.no_grad():
        torch.onnx.export(
            decoder, example, str(path), input_names=names, output_names=["wave"], opset_version=17,
            dynamo=dynamo, **kwargs,
        )  # fmt: skip

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch_size, frames in [(1, 37), (3, 120)]:
        mel = random_mel(batch_size, frames, seed=frames)
        lengths = torch.tensor([frames, frames // 2, 1][:batch_size])
        feeds = {"mel": mel.numpy()}
        if with_lengths:
            feeds["lengths"] = lengths.numpy()
        (wave,) = session.run(None, feeds)
        with torch.inference_mode():
            expected = decoder(mel, lengths if with_lengths else None).numpy()
        assert wave.shape == expected.shape == (batch_size, (frames - 1) * 256)
        assert np.abs(wave - expected).max() < 1e-5


# --------------------------------------------------------------------------------------------
# Loading errors


def test_load_vocos_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*f5-triton build checkpoint"):
        load_vocos(tmp_path / "nowhere")


@pytest.mark.parametrize("missing", ["pytorch_model.bin", "config.yaml"])
def test_load_vocos_missing_file(tmp_path, missing):
    folder = make_random_vocos(tmp_path)
    (folder / missing).unlink()
    with pytest.raises(CheckpointError, match=f"lacks {missing}.*make_random_checkpoint"):
        load_vocos(folder)


def test_load_vocos_corrupt_weights(tmp_path):
    folder = make_random_vocos(tmp_path)
    (folder / "pytorch_model.bin").write_bytes(b"\x00not a torch file" * 100)
    with pytest.raises(CheckpointError, match="cannot read Vocos weights"):
        load_vocos(folder)

    torch.save([1, 2, 3], folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_vocos(folder)


def test_load_vocos_weights_of_another_size(tmp_path):
    small = make_random_vocos(tmp_path / "small", small=True)
    full = make_random_vocos(tmp_path / "full", small=False)
    (full / "pytorch_model.bin").write_bytes((small / "pytorch_model.bin").read_bytes())
    with pytest.raises(CheckpointError, match="do not match"):
        load_vocos(full)


def test_load_vocos_bad_config(tmp_path):
    folder = make_random_vocos(tmp_path)
    (folder / "config.yaml").write_text("backbone: [unclosed")
    with pytest.raises(CheckpointError, match="cannot build Vocos"):
        load_vocos(folder)

    config = vocos_config(small=True)
    config["head"]["init_args"]["padding"] = "same"  # vocos' other ISTFT; no published mel Vocos uses it
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="not a mel Vocos .*padding 'center'"):
        load_vocos(folder)
