"""The DiT equals upstream F5-TTS numerically and loads its state dict names; batching is clean."""

import pytest
import torch

import upstream
from f5_triton.checkpoints import random_dit
from f5_triton.config import ARCHITECTURES
from f5_triton.model import DiT

VARIANTS = {
    "v1": {},
    "v0": dict(text_mask_padding=False, pe_attn_head=1),
    "qk_norm": dict(qk_norm="rms_norm"),
    "no_conv": dict(conv_layers=0),
}


def upstream_dit(config, **extra):
    module = upstream.load("model.backbones.dit")
    kwargs = {k: getattr(config, k) for k in config.__dataclass_fields__}
    return module.DiT(**kwargs, **extra)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("drop", [False, True])
def test_matches_upstream_fp32(variant, drop):
    config = ARCHITECTURES["tiny"].replace(**VARIANTS[variant])
    ours = random_dit(config, seed=1)
    ref = upstream_dit(config).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    torch.manual_seed(2)
    x, cond = torch.randn(1, 77, 100), torch.randn(1, 77, 100)
    text, time = torch.randint(0, 256, (1, 41)), torch.rand(1)
    with torch.no_grad():
        expected = ref(x, cond, text, time, drop_audio_cond=drop, drop_text=drop)
        got = ours(x, cond, text, time, drop_audio_cond=drop, drop_text=drop)
    assert expected.abs().max() > 0.1  # a real signal, not zeros
    assert (got - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["F5TTS_v1_Base", "F5TTS_Base", "F5TTS_v1_Small", "F5TTS_Small"])
def test_state_dict_names_equal_upstream(name):
    config = ARCHITECTURES[name]
    with torch.device("meta"):
        ours = DiT.from_config(config).state_dict()
        theirs = upstream_dit(config).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@pytest.mark.parametrize("variant", ["v1", "v0"])
def test_batched_step_equals_single(variant):
    """A request's output does not depend on its batch neighbours (padding is masked everywhere)."""
    config = ARCHITECTURES["tiny"].replace(**VARIANTS[variant])
    model = random_dit(config, seed=3)
    torch.manual_seed(4)
    lens = [60, 97, 31]
    n = max(lens)
    x, cond = torch.randn(3, n, 100), torch.randn(3, n, 100)
    text = torch.full((3, 50), -1)
    for i, length in enumerate([20, 50, 12]):
        text[i, :length] = torch.randint(0, 256, (length,))
    mask = torch.arange(n)[None] < torch.tensor(lens)[:, None]
    time = torch.rand(3)
    with torch.no_grad():
        batched = model(x, cond, text, time, mask=mask)
        for i, length in enumerate(lens):
            alone = model(x[i:i + 1, :length], cond[i:i + 1, :length], text[i:i + 1], time[i:i + 1])
            assert (batched[i, :length] - alone[0]).abs().max() < 1e-4


def test_single_request_equals_upstream_unbatched_even_when_batched():
    """Batched with padding, each request still equals upstream run on that request alone."""
    config = ARCHITECTURES["tiny"]
    ours = random_dit(config, seed=5)
    ref = upstream_dit(config).eval()
    ref.load_state_dict(ours.state_dict())
    torch.manual_seed(6)
    x, cond = torch.randn(2, 80, 100), torch.randn(2, 80, 100)
    text = torch.randint(0, 256, (2, 30))
    mask = torch.arange(80)[None] < torch.tensor([80, 55])[:, None]
    time = torch.rand(2)
    with torch.no_grad():
        batched = ours(x, cond, text, time, mask=mask)
        expected = ref(x[1:, :55], cond[1:, :55], text[1:], time[1:])
    assert (batched[1, :55] - expected[0]).abs().max() <= 1e-4


def test_rejects_unknown_qk_norm():
    with pytest.raises(ValueError, match="qk_norm"):
        DiT.from_config(ARCHITECTURES["tiny"].replace(qk_norm="layer_norm"))


def test_key_bias_attention_equals_masked_sdpa():
    """The GPU path (mask carried as a key bias) equals SDPA with a boolean key mask."""
    from f5_triton.model.dit import attention_with_key_bias

    torch.manual_seed(7)
    q, k, v = (torch.randn(3, 2, 40, 64) for _ in range(3))
    valid = torch.arange(40)[None] < torch.tensor([40, 25, 3])[:, None]
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    got = attention_with_key_bias(q, k, v, valid)
    assert (got - expected).abs().max() < 1e-5


def test_fused_projections_are_exact():
    model = random_dit(ARCHITECTURES["tiny"], seed=8)
    torch.manual_seed(9)
    x, cond, text, time = torch.randn(2, 30, 100), torch.randn(2, 30, 100), torch.randint(0, 256, (2, 20)), torch.rand(2)
    with torch.no_grad():
        before = model(x, cond, text, time)
        keys = list(model.state_dict())
        after = model.fuse_projections()(x, cond, text, time)
    assert torch.allclose(before, after, atol=1e-5)
    assert list(model.state_dict()) == keys  # checkpoints still save and load with upstream's names


def test_conv_position_embedding_as_matmul_equals_conv():
    """The GPU formulation (grouped conv as one GEMM over unfolded windows) equals nn.Conv1d, masks included."""
    from f5_triton.model.dit import ConvPositionEmbedding

    torch.manual_seed(10)
    module = ConvPositionEmbedding(64, groups=16).eval()
    x = torch.randn(3, 50, 64)
    keep = (torch.arange(50)[None] < torch.tensor([50, 31, 7])[:, None]).unsqueeze(-1).float()
    with torch.no_grad():
        for k in (None, keep):
            assert (module.forward_as_matmul(x, k) - module(x, k)).abs().max() < 1e-5


def test_depthwise_conv_as_shifted_sums_equals_conv1d():
    """The text blocks' depthwise convolution written as shifted multiply-adds equals nn.Conv1d (upstream's op)."""
    from f5_triton.model.dit import depthwise_conv1d

    torch.manual_seed(11)
    conv = torch.nn.Conv1d(32, 32, kernel_size=7, padding=3, groups=32)
    x = torch.randn(2, 41, 32)
    with torch.no_grad():
        expected = conv(x.transpose(1, 2)).transpose(1, 2)
        assert (depthwise_conv1d(x, conv) - expected).abs().max() < 1e-5
        half = depthwise_conv1d(x.bfloat16(), conv)  # accumulated in fp32: only the output's rounding
        assert half.dtype == torch.bfloat16 and (half.float() - expected).abs().max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cudnn_masked_attention_equals_the_key_bias_channel_on_gpu(dit):
    """select_attention_kernels swaps the key-bias channel for cuDNN's masked attention: same padded-batch output."""
    import copy

    from f5_triton.engines import DIT_STEP
    from f5_triton.engines.networks import random_inputs

    model = copy.deepcopy(dit).to("cuda", torch.float16).eval()
    inputs = [t.cuda() for t in random_inputs(DIT_STEP, (64, 40), {"mel": 100, "text": model.config.text_dim})]
    inputs = [t.half() if t.is_floating_point() else t for t in inputs]
    with torch.inference_mode():
        key_bias = model.step(*inputs)
        assert model.select_attention_kernels().transformer_blocks[0].attn.cudnn_masked
        cudnn = model.step(*inputs)
    assert (cudnn[0] - key_bias[0]).abs().max() <= 2e-2
    assert (cudnn[1, :40] - key_bias[1, :40]).abs().max() <= 2e-2


def test_gemm_epilogues_stay_off_on_the_cpu():
    """Off the GPU the fused op's GELU is the exact one, not upstream's tanh: the flag must not turn on."""
    model = random_dit(ARCHITECTURES["tiny"], seed=8).use_gemm_epilogues()
    assert not any(block.ff.gelu_epilogue for block in model.transformer_blocks)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gelu_gemm_epilogue_equals_the_separate_gelu_on_gpu():
    model = random_dit(ARCHITECTURES["tiny"], seed=8).to("cuda", torch.float16).eval()
    torch.manual_seed(9)
    x, cond = torch.randn(2, 30, 100, device="cuda", dtype=torch.float16), torch.randn(2, 30, 100, device="cuda",
                                                                                      dtype=torch.float16)
    text, time = torch.randint(0, 256, (2, 20), device="cuda"), torch.rand(2, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        before = model(x, cond, text, time)
        assert model.use_gemm_epilogues().transformer_blocks[0].ff.gelu_epilogue
        after = model(x, cond, text, time)
    assert (after - before).abs().max() <= 2e-2 * before.abs().max()


LENGTH_MIXES = {"one": [70], "ragged": [60, 97, 31], "many_short": [17, 5, 40, 33, 1, 64], "equal": [48, 48]}


@pytest.mark.parametrize("variant", ["v1", "v0", "qk_norm"])
@pytest.mark.parametrize("mix", LENGTH_MIXES)
def test_packed_step_equals_each_sequence_alone(variant, mix):
    """Sequences end to end, no padding: each equals its unbatched step (conv, rotary, modulation per sequence)."""
    from f5_triton.model.packing import Packing

    config = ARCHITECTURES["tiny"].replace(**VARIANTS[variant])
    model = random_dit(config, seed=7)
    lens = LENGTH_MIXES[mix]
    torch.manual_seed(8)
    xs = [torch.randn(n, 100) for n in lens]
    conds = [torch.randn(n, 100) for n in lens]
    embeds = [torch.randn(n, config.text_dim) for n in lens]
    time = torch.rand(len(lens))
    with torch.no_grad():
        packed = model.step(torch.cat(xs), torch.cat(conds), torch.cat(embeds), time, Packing.of(lens))
        start = 0
        for i, n in enumerate(lens):
            alone = model.step(xs[i][None], conds[i][None], embeds[i][None], time[i:i + 1])[0]
            assert alone.abs().max() > 0.1
            assert (packed[start:start + n] - alone).abs().max() <= 1e-4
            start += n
    assert packed.shape == (sum(lens), 100)


def test_packed_attention_block_mask_while_tracing_equals_the_loop():
    """The ONNX-export path (one block-diagonal mask over all tokens) equals SDPA run per sequence."""
    from f5_triton.model.dit import packed_attention
    from f5_triton.model.packing import Packing

    packing = Packing.of([9, 30, 4])
    torch.manual_seed(9)
    q, k, v = (torch.randn(43, 2, 16) for _ in range(3))
    loop = packed_attention(q, k, v, packing)
    traced = torch.jit.trace(lambda q, k, v: packed_attention(q, k, v, packing), (q, k, v), check_trace=False)
    assert str(traced.graph).count("scaled_dot_product_attention") == 1  # one masked call, not a loop
    assert (traced(q, k, v) - loop).abs().max() <= 1e-5
    first = torch.nn.functional.scaled_dot_product_attention(*(t[:9].transpose(0, 1) for t in (q, k, v)))
    assert torch.allclose(loop[:9], first.transpose(0, 1), atol=1e-6)


def test_packing_layout():
    from f5_triton.model.packing import CONV_GAP, Packing

    packing = Packing.of([3, 2])
    assert packing.cu_seqlens.tolist() == [0, 3, 5] and packing.sequence_ids.tolist() == [0, 0, 0, 1, 1]
    assert packing.positions.tolist() == [0, 1, 2, 0, 1] and packing.max_length == 4096
    assert packing.gapped_index.tolist() == [CONV_GAP, CONV_GAP + 1, CONV_GAP + 2, 2 * CONV_GAP + 3, 2 * CONV_GAP + 4]
    assert packing.gapped_valid.sum() == 5 and packing.gapped_valid.shape == (5 + 3 * CONV_GAP,)
    assert Packing.of([4096]).max_length == 4096 and Packing.of([4097]).max_length == 8192
    with pytest.raises(ValueError, match="at least one token"):
        Packing.of([3, 0])
