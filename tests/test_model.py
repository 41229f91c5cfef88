"""The DiT equals upstream F5-TTS numerically and loads its state dict names; batching is clean."""

import dataclasses

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


def test_fused_projections_are_upstreams_and_the_state_dict_round_trips():
    """q/k/v are one fused weight, made from upstream's three as they load and split back in `state_dict`."""
    model = random_dit(ARCHITECTURES["tiny"], seed=8)
    state = model.state_dict()
    ref = upstream_dit(model.config).eval()
    ref.load_state_dict(state, strict=True)
    assert list(state) == list(ref.state_dict())
    again = DiT.from_config(model.config)
    again.load_state_dict(state, strict=True)
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())
    attn, theirs = model.transformer_blocks[0].attn, ref.transformer_blocks[0].attn
    head = model.config.dim_head
    x, rope = torch.randn(2, 30, model.dim), (torch.ones(30, head), torch.zeros(30, head))
    with torch.no_grad():
        fused = attn._qkv(x, rope)
        plain = [proj(x).unflatten(-1, (attn.heads, attn.dim_head)) for proj in (theirs.to_q, theirs.to_k, theirs.to_v)]
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(fused, plain))
    with pytest.raises(RuntimeError, match="to_q.weight"):
        DiT.from_config(model.config).load_state_dict({k: v for k, v in state.items() if "to_k." not in k})
    live = model.state_dict(keep_vars=True)  # what tracers (the ONNX exporter) map parameters by
    assert live["transformer_blocks.0.attn.qkv_weight"] is model.transformer_blocks[0].attn.qkv_weight


def test_fused_projections_start_as_three_linear_layers():
    """The fused weight is initialised as the three projections were, in order: random checkpoints do not change."""
    from f5_triton.model.dit import Attention

    torch.manual_seed(5)
    attn = Attention(64, 2, 32, None, None)
    torch.manual_seed(5)
    projections = [torch.nn.Linear(64, 64) for _ in range(3)]
    assert torch.equal(attn.qkv_weight, torch.cat([p.weight for p in projections]))
    assert torch.equal(attn.qkv_bias, torch.cat([p.bias for p in projections]))


def test_kernels_are_the_plain_path_off_the_gpu():
    """Off the GPU `optimize_for` keeps the plain path (the fused GELU op there is the exact one, not the tanh one)."""
    from f5_triton.model.dit import Kernels

    model = random_dit(ARCHITECTURES["tiny"], seed=8)
    assert model.kernels == Kernels() and model.optimize_for("cpu", torch.float32).kernels == Kernels()
    assert Kernels.for_device("cpu", torch.float16) == Kernels()
    with pytest.raises(ValueError, match="attention kernels"):
        Kernels(padded="key_bias")


def test_conv_position_embedding_gpu_formulation_equals_conv():
    """The GPU formulation (a 2-D conv on an NHWC view) equals nn.Conv1d, masks included."""
    from f5_triton.model.dit import ConvPositionEmbedding

    torch.manual_seed(10)
    module = ConvPositionEmbedding(64, groups=16).eval()
    x = torch.randn(3, 50, 64)
    keep = (torch.arange(50)[None] < torch.tensor([50, 31, 7])[:, None]).unsqueeze(-1).float()
    with torch.no_grad():
        for k in (None, keep):
            assert (module.forward_channels_last(x, k) - module(x, k)).abs().max() < 1e-5


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


def _plain_and_optimized(model, dtype):
    """`model` on the GPU in `dtype` twice: on the plain path (moved only) and as `optimize_for` makes it."""
    import copy

    return copy.deepcopy(model).to("cuda", dtype).eval(), copy.deepcopy(model).optimize_for("cuda", dtype)


@pytest.mark.gpu
def test_padded_attention_kernel_equals_the_plain_path_on_gpu():
    """The padded-batch kernel `optimize_for` picks (FlashAttention-4 with key lengths where flash-attn-4 runs, else
    cuDNN's masked attention) gives the plain path's output, also replayed from a CUDA graph with other lengths."""
    from f5_triton.engines import DIT_STEP
    from f5_triton.engines.networks import random_inputs
    from f5_triton.model import fa4

    config = ARCHITECTURES["tiny"].replace(heads=2, dim_head=64, dim=128)  # head size of the released models
    plain, fast = _plain_and_optimized(random_dit(config, seed=12), torch.float16)
    assert fast.kernels.padded == ("fa4" if fa4.works(torch.device("cuda"), torch.float16) else "cudnn")

    def inputs(lengths, seed):
        tensors = [t.cuda() for t in random_inputs(DIT_STEP, lengths, {"mel": 100, "text": config.text_dim}, seed=seed)]
        return [t.half() if t.is_floating_point() else t for t in tensors]

    def close(got, expected, lengths):
        for row, n in enumerate(lengths):
            assert (got[row, :n] - expected[row, :n]).abs().max() <= 2e-2 * expected[row, :n].abs().max()

    with torch.inference_mode():
        first = inputs((64, 40), seed=1)
        close(fast.step(*first), plain.step(*first), (64, 40))
        static = [t.clone() for t in first]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fast.step(*static)  # kernels compiled and workspaces made outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fast.step(*static)
        second = inputs((17, 64), seed=2)  # the same shape, other valid lengths: read at replay, not captured
        for buffer, value in zip(static, second):
            buffer.copy_(value)
        graph.replay()
        close(out, plain.step(*second), (17, 64))


@pytest.mark.gpu
def test_conv_position_embedding_on_gpu_equals_conv_at_every_size():
    """On the GPU the position convolution takes the NHWC form, for a single request's rows and a burst's alike; it
    gives nn.Conv1d's result (fp32 on the CPU), eager and compiled."""
    import copy

    from f5_triton.model.dit import ConvPositionEmbedding

    torch.manual_seed(13)
    module = ConvPositionEmbedding(1024).eval()
    gpu = copy.deepcopy(module).to("cuda", torch.float16)
    compiled = torch.compile(gpu)
    with torch.inference_mode():
        for rows in (300, 14000):
            x = torch.randn(1, rows, 1024)
            keep = (torch.rand(1, rows, 1) > 0.05).float()
            expected = module(x, keep)
            x16, keep16 = x.to("cuda", torch.float16), keep.to("cuda", torch.float16)
            for fn in (gpu, compiled):
                assert (fn(x16, keep16).float().cpu() - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.gpu
def test_gelu_gemm_epilogue_equals_the_separate_gelu_on_gpu():
    """The GELU in the GEMM's epilogue (and every other kernel `optimize_for` picks) gives the plain path's output."""
    plain, fast = _plain_and_optimized(random_dit(ARCHITECTURES["tiny"], seed=8), torch.float16)
    assert fast.kernels.gelu_epilogue
    torch.manual_seed(9)
    x, cond = torch.randn(2, 30, 100, device="cuda", dtype=torch.float16), torch.randn(2, 30, 100, device="cuda",
                                                                                      dtype=torch.float16)
    text, time = torch.randint(0, 256, (2, 20), device="cuda"), torch.rand(2, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        before, after = plain(x, cond, text, time), fast(x, cond, text, time)
    assert (after - before).abs().max() <= 2e-2 * before.abs().max()


@pytest.mark.gpu
def test_packed_attention_kernel_equals_the_plain_path_on_gpu():
    """The packed-batch kernel `optimize_for` picks (FlashAttention-4's where flash-attn-4 runs, else torch's
    varlen flash) gives each sequence the plain path's output, alone and compiled (the FA4 call is a custom op)."""
    from f5_triton.model import fa4
    from f5_triton.model.packing import Packing

    config = ARCHITECTURES["tiny"].replace(heads=2, dim_head=64, dim=128)  # head size of the released models
    plain, fast = _plain_and_optimized(random_dit(config, seed=5), torch.float16)
    assert fast.kernels.packed == ("fa4" if fa4.works(torch.device("cuda"), torch.float16) else "varlen")
    lens = [300, 17, 129]
    torch.manual_seed(6)
    x, cond = (torch.randn(sum(lens), 100, device="cuda", dtype=torch.float16) for _ in range(2))
    embed = torch.randn(sum(lens), config.text_dim, device="cuda", dtype=torch.float16)
    time = torch.rand(len(lens), device="cuda", dtype=torch.float16)
    packing = Packing.of(lens, "cuda")
    with torch.inference_mode():
        expected = plain.step(x, cond, embed, time, packing)  # SDPA per sequence
        got = fast.step(x, cond, embed, time, packing)
        compiled = torch.compile(fast.step, dynamic=True)(x, cond, embed, time, packing)
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 2e-2 * scale
    assert (compiled - expected).abs().max() <= 2e-2 * scale


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


def test_rotary_table_gives_the_angles_computed_per_call():
    """`optimize_for` tabulates the rotary angles once: padded and packed steps equal those that compute them per
    call (bit for bit: the same fp32 arithmetic), and the table is read, not recomputed."""
    from f5_triton.model.dit import ROTARY_TABLE_POSITIONS
    from f5_triton.model.packing import Packing

    config = ARCHITECTURES["tiny"]
    model = random_dit(config, seed=3)
    lens = [37, 80, 5]
    torch.manual_seed(4)
    x, cond = torch.randn(2, sum(lens), 100), torch.randn(2, sum(lens), 100)
    embed = torch.randn(2, sum(lens), config.text_dim)
    time, packed_time = torch.rand(2), torch.rand(3)
    packing = Packing.of(lens)
    with torch.no_grad():
        padded_before = model.step(x, cond, embed, time)
        packed_before = model.step(x[0], cond[0], embed[0], packed_time, packing)
        model.optimize_for("cpu", torch.float32)
        assert model.rotary_embed.table[0].shape == (ROTARY_TABLE_POSITIONS, config.dim_head)
        assert torch.equal(model.step(x, cond, embed, time), padded_before)
        assert torch.equal(model.step(x[0], cond[0], embed[0], packed_time, packing), packed_before)
        cos, sin = model.rotary_embed(0, "cpu", positions=packing.positions, bound=packing.max_length)
        assert torch.equal(cos[37:40], model.rotary_embed.table[0][:3]) and torch.equal(sin[:37], model.rotary_embed.table[1][:37])
        model.half()  # the table follows moves and casts: made again, in fp32, from the cast inv_freq
        assert model.rotary_embed.table[0].dtype == torch.float32
        assert torch.equal(model.rotary_embed.table[1][:80], model.rotary_embed._angles(torch.arange(80.0))[1])
        model.float()
        model.rotary_embed.table = tuple(torch.zeros_like(t) for t in model.rotary_embed.table)
        assert not torch.equal(model.step(x, cond, embed, time), padded_before)  # the step reads the table


def test_compiled_steps_read_the_rotary_table_and_exported_graphs_compute_the_angles():
    """Under torch.compile (what the GPU engine runs) the rotary angles come from the table, padded and packed: no
    sin/cos in the traced graph. Under torch.export (the dynamo ONNX exporter) they are computed per call, so that an
    exported graph holds no table. torch.compile folds `torch.compiler.is_exporting()` to True, which once kept the
    table out of compiled steps."""
    from f5_triton.model.dit import RotaryEmbedding

    rotary = RotaryEmbedding(16)
    rotary.tabulate(64)

    class Padded(torch.nn.Module):
        def forward(self, x):
            return rotary(x.shape[0], x.device)

    class Packed(torch.nn.Module):
        def forward(self, positions):
            return rotary(0, positions.device, positions=positions, bound=64)

    def traced_ops(module, example) -> set[str]:
        ops = set()

        def backend(gm, example_inputs):
            ops.update(getattr(n.target, "__name__", str(n.target)) for n in gm.graph.nodes
                       if n.op in ("call_function", "call_method"))
            return gm.forward

        torch._dynamo.reset()
        got = torch.compile(module, backend=backend, dynamic=True)(example)
        expected = module(example)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        return ops

    positions = torch.tensor([0, 1, 2, 0, 1, 5])
    for module, example in ((Padded(), torch.zeros(40, 3)), (Packed(), positions)):
        ops = traced_ops(module, example)
        assert "getitem" in ops and not {"cos", "sin", "outer"} & ops, ops
        exported = torch.export.export(module, (example,))
        assert {"cos", "sin"} <= {str(n.target).split(".")[1] for n in exported.graph.nodes if n.op == "call_function"}


def test_fa4_attention_is_one_opaque_op_for_the_compiler():
    """FlashAttention-4's kernels are compiled at first use, out of torch.compile's reach: packed and padded steps
    trace each call as one custom-op node whose fake gives the output's shape, without running it (no GPU needed).
    Where it cannot run (here: no CUDA), `optimize_for` does not pick it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from f5_triton.model import fa4
    from f5_triton.model.dit import Kernels, packed_attention
    from f5_triton.model.packing import Packing

    packing = Packing.of([9, 30, 4])
    q = torch.randn(43, 2, 64, dtype=torch.float16)
    graph = make_fx(lambda q, k, v, cu: packed_attention(q, k, v, dataclasses.replace(packing, cu_seqlens=cu), "fa4"),
                    tracing_mode="fake")(q, q, q, packing.cu_seqlens)
    calls = [node for node in graph.graph.nodes if node.op == "call_function"]
    assert [str(node.target) for node in calls] == ["f5_triton.fa4_varlen_attention.default"]
    assert calls[0].meta["val"].shape == (43, 2, 64) and calls[0].meta["val"].dtype == torch.float16
    assert not fa4.works(torch.device("cpu"), torch.float16)
    assert Kernels.for_device("cpu", torch.float16) == Kernels()

    class Step(torch.nn.Module):  # a padded step with the FA4 kernels (as optimize_for picks them where FA4 runs)
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model.step(*inputs)

    config = ARCHITECTURES["tiny"].replace(heads=2, dim_head=64, dim=128)
    model = random_dit(config, seed=1).eval()
    model.kernels = Kernels(padded="fa4", packed="fa4")  # a test's stand-in for a GPU where FA4 runs
    x, embed = torch.randn(2, 30, 100), torch.randn(2, 30, config.text_dim)
    mask = torch.arange(30)[None] < torch.tensor([30, 20])[:, None]
    exported = torch.export.export(Step(model), (x, x, embed, torch.rand(2), mask), strict=False)
    calls = [node for node in exported.graph.nodes if node.op == "call_function"]
    attention = [node for node in calls if "attention" in str(node.target)]
    assert [str(node.target) for node in attention] == ["f5_triton.fa4_padded_attention.default"] * config.depth
    key_lengths = attention[0].args[3].meta["val"]  # each row's valid frames, from the mask
    assert key_lengths.shape == (2,) and key_lengths.dtype == torch.int32


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
