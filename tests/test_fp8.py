"""FP8 matrix multiplies (opt-in): quantization, the emulated product, the DiT with them, and the CUDA kernel."""

import copy

import pytest
import torch

from f5_triton.checkpoints import random_dit
from f5_triton.config import ARCHITECTURES
from f5_triton.model.fp8 import FP8, Fp8Linear, quantize_rows


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_row_quantization_round_trips_within_e4m3_precision():
    torch.manual_seed(0)
    t = torch.randn(64, 256) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different magnitude
    t[5] = 0
    q, scale = quantize_rows(t)
    assert q.dtype == FP8 and scale.shape == (64, 1)
    back = q.float() * scale
    assert torch.equal(back[5], torch.zeros(256))
    assert (back.abs().amax(dim=1)[t.abs().amax(dim=1) > 0] > 0).all()  # per-row scales keep small rows alive
    assert rel(back, t) < 0.04  # 3 mantissa bits: ~2-3 % RMS


def test_fp8_linear_matches_the_linear_it_replaces():
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 96)
    x = torch.randn(3, 40, 256)
    fp8 = Fp8Linear.from_linear(linear)
    with torch.no_grad():
        assert rel(fp8(x), linear(x)) < 0.06
        assert fp8(x).shape == (3, 40, 96) and fp8(x).dtype == x.dtype


def test_dit_with_fp8_gemms_stays_close_to_fp32():
    model = random_dit(ARCHITECTURES["tiny"], seed=8).eval()
    torch.manual_seed(9)
    x, cond, text, time = torch.randn(2, 30, 100), torch.randn(2, 30, 100), torch.randint(0, 256, (2, 20)), torch.rand(2)
    mask = torch.arange(30)[None] < torch.tensor([30, 22])[:, None]
    with torch.no_grad():
        before = model(x, cond, text, time, mask)
        quantized = copy.deepcopy(model).use_fp8_gemms().use_gemm_epilogues()
        after = quantized(x, cond, text, time, mask)
    attn, ff = quantized.transformer_blocks[0].attn, quantized.transformer_blocks[0].ff
    assert isinstance(attn.qkv_fp8, Fp8Linear) and isinstance(ff.ff[2], Fp8Linear) and not ff.gelu_epilogue
    assert rel(after, before) < 0.02  # 0.002 measured: the residual stream carries most of the output
    assert rel(after[1, :22], before[1, :22]) < 0.02  # padded rows stay out of valid ones


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs an FP8 GPU (compute capability >= 8.9)")
def test_scaled_mm_on_gpu_equals_the_emulation():
    torch.manual_seed(2)
    linear = torch.nn.Linear(1024, 3072).cuda().half()
    x = torch.randn(2, 300, 1024, device="cuda", dtype=torch.float16)
    fp8 = Fp8Linear.from_linear(linear)
    with torch.no_grad():
        gpu = fp8(x)
        emulated = fp8.cpu()(x.cpu().float()).cuda()
        assert rel(gpu, emulated) < 0.01 and gpu.dtype == torch.float16
        assert rel(gpu, linear(x)) < 0.06


def test_pipeline_and_repository_take_the_fp8_option(tiny_ckpt, ref_wave, tmp_path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from f5_triton.pipeline import TTS
    from f5_triton.serving.repository import RepositoryOptions, render
    from f5_triton.request import validate_request

    paths = (tiny_ckpt / "model.safetensors", tiny_ckpt / "vocab.txt", tiny_ckpt / "vocos")
    request = validate_request(ref_wave, "Some call me nature.", "Hello there.", seed=3, nfe_steps=4)
    exact = TTS.from_paths(*paths).synthesize([request])[0]
    fp8 = TTS.from_paths(*paths, fp8=True)
    assert isinstance(fp8.flow_matching.model.transformer_blocks[0].attn.qkv_fp8, Fp8Linear)
    audio = fp8.synthesize([request])[0]
    assert audio.shape == exact.shape and rel(torch.from_numpy(audio), torch.from_numpy(exact)) < 0.05

    out = render(RepositoryOptions(target="gpu", ckpt=paths[0], vocab=paths[1], vocoder=paths[2], dit_fp8=True),
                 tmp_path / "repo")
    config = text_format.Parse((out / "flow_matching" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert config.parameters["dit_fp8"].string_value == "true"
