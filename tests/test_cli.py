"""`f5-triton synth` end to end, and its errors for bad input."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from f5_triton.config import SAMPLE_RATE

REF_TEXT = "Some call me nature, others call me mother nature."


def synth(*args):
    return subprocess.run([sys.executable, "-m", "f5_triton.cli", "synth", *args], capture_output=True, text=True,
                          timeout=300)


def test_synth_writes_wav_of_expected_length(tmp_path, tiny_ckpt, ref_en):
    from f5_triton.pipeline import Preprocessor
    from f5_triton.request import validate_request
    from f5_triton.text import Tokenizer

    text = "I don't really care what you call me."
    out = tmp_path / "out.wav"
    result = synth("--ckpt-dir", str(tiny_ckpt), "--ref-audio", str(ref_en), "--ref-text", REF_TEXT,
                   "--text", text, "-o", str(out), "--nfe", "4", "--seed", "1", "--speed", "1.2", "--cfg", "1.5")
    assert result.returncode == 0, result.stderr
    wave, rate = sf.read(out, dtype="float32")
    assert rate == SAMPLE_RATE
    ref, _ = sf.read(ref_en, dtype="float32")
    job = Preprocessor(Tokenizer(tiny_ckpt / "vocab.txt"))(
        validate_request(ref, REF_TEXT, text, speed=1.2)).jobs[0]
    assert len(wave) == (job.duration - job.ref_frames - 1) * 256  # Vocos: (frames - 1) * hop
    assert np.isfinite(wave).all() and np.abs(wave).max() > 0


@pytest.mark.parametrize("case,expected", [
    ("missing_ref", "reference_audio"),
    ("empty_text", "target_text: is empty"),
    ("rate_96k", "sample_rate: sample rate 96000 Hz is outside the allowed range [8000, 48000] Hz"),
    ("corrupt_ckpt", "cannot read checkpoint"),
    ("vocab_mismatch", "vocab has"),
    ("no_model", "--ckpt-dir"),
])
def test_synth_errors(tmp_path, tiny_ckpt, ref_en, case, expected):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    ref, text = str(ref_en), "Hello there, world."
    if case == "missing_ref":
        ref = str(tmp_path / "nope.wav")
    elif case == "empty_text":
        text = "   "
    elif case == "rate_96k":
        wave, rate = sf.read(ref_en, dtype="float32")
        ref = str(tmp_path / "ref96.wav")
        sf.write(ref, np.repeat(wave, 4), 96000)
    elif case == "corrupt_ckpt":
        (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    elif case == "vocab_mismatch":
        with open(ckpt / "vocab.txt", "a") as f:
            f.write("extra1\nextra2\n")
    args = ["--ref-audio", ref, "--ref-text", REF_TEXT, "--text", text, "-o", str(tmp_path / "o.wav")]
    if case != "no_model":
        args = ["--ckpt-dir", str(ckpt), *args]
    result = synth(*args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
