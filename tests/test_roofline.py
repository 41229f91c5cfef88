"""The packed DiT step's cost model (benchmarks/bench.py `step_costs`), counted against torch's own counters, and
the attribution of a profile's kernels to its kinds (`step_kind`). The GPU side runs in scripts/packed_bench.py
--profile (docs/benchmarks.md, issue 33)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks import bench
from f5_triton.checkpoints import random_dit
from f5_triton.config import ARCHITECTURES
from f5_triton.model.packing import Packing

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = ARCHITECTURES["tiny"]
GEMM_KINDS = ("GEMM q/k/v + out", "GEMM feed-forward", "GEMM input projection", "GEMM output projection",
              "time embedding + modulation")


def packed_step(lengths, mode):
    """The tiny model's eager packed step on CPU over sequences of `lengths`, inside `mode` (a counter)."""
    model, packing = random_dit(TINY), Packing.of(lengths)
    x, cond = torch.randn(packing.tokens, TINY.mel_dim), torch.randn(packing.tokens, TINY.mel_dim)
    text, time = torch.randn(packing.tokens, TINY.text_dim), torch.rand(len(lengths))
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), mode:  # SDPA as bmm's, which the counters count
        model.step(x, cond, text, time, packing)


@pytest.mark.parametrize("lengths", [[37, 50, 23], [64, 64], [5, 90, 1, 31]])
def test_matrix_flops_by_kind_equal_the_flop_counters(lengths):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    packed_step(lengths, counter)
    counted = {str(op): flops for op, flops in counter.get_flop_counts()["Global"].items()}
    costs = bench.step_costs(TINY, lengths)
    assert tuple(costs) == bench.STEP_KINDS
    assert counted["aten.addmm"] == sum(costs[kind].flops for kind in GEMM_KINDS)
    assert counted["aten.bmm"] == costs["attention"].flops  # each sequence's own n^2, not the packed batch's
    assert counted["aten.convolution"] == costs["position convolution"].flops
    assert sum(counted.values()) == sum(cost.flops for cost in costs.values())
    assert bench.dit_step_flops(TINY, 2 * 64, 64) == sum(c.flops for c in bench.step_costs(TINY, [64, 64]).values())


def test_the_profilers_gemms_fall_into_their_kinds_by_shape():
    """What packed_bench.py --profile does with each GEMM kernel's op, on the ops of a CPU profile: the FLOPs the
    profiler computes for each addmm, summed by `step_kind`, are the cost model's for each GEMM kind."""
    from torch.profiler import ProfilerActivity, profile

    lengths = [37, 50, 23]
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True)
    packed_step(lengths, prof)
    flops = {}
    for event in prof.profiler.kineto_results.events():
        if event.name() in bench.GEMM_OPS:
            kind = bench.step_kind(TINY, sum(lengths), len(lengths), event.name(), event.name(), event.shapes())
            flops[kind] = flops.get(kind, 0) + event.flops()
    costs = bench.step_costs(TINY, lengths)
    assert flops == {kind: costs[kind].flops for kind in GEMM_KINDS}


# Kernel names of compiled packed steps profiled on an H200 (docs/results/h200-packed-profile-s9-before.log,
# h200-packed-burst-s11.json, h200-packed-burst-s12-nhwc.json)
PROFILED_KERNELS = {
    "kernel_cutlass_kernel_flash_attncuteflash_fwd_sm90FlashAttentionForwardSm90_object_at__tensor000o111012":
        "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::half_t>>":
        "attention",
    "triton_red_fused_add_index_mul_native_layer_norm_split_11": "norms + modulation + residual",
    "triton_per_fused_add_index_mul_native_layer_norm_split_13": "norms + modulation + residual",
    # the first norm, fused with the position convolution's last Mish
    "triton_per_fused__to_copy_add_clone_convolution_index_index_select_mish_mul_native_layer_norm_select_split":
        "norms + modulation + residual",
    "triton_poi_fused__to_copy_add_fa4_varlen_attention_index_mul_neg_select_stack_unbind_unsqueeze_view_10":
        "rotary q/k",
    "triton_poi_fused__to_copy_add_clone_cos_expand_fa4_varlen_attention_mul_neg_select_sin_stack_unbind_unsqueeze":
        "rotary q/k",  # before the rotary table: sin and cos in the q/k kernel
    "triton_poi_fused__to_copy__varlen_attn_add_clone_cos_expand_mul_neg_select_sin_stack_unbin":
        "rotary q/k",  # with torch's varlen kernel (the old profile's name-only sort took it for attention)
    "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize256x64x32_warpgroupsize1x1x1_g1":
        "position convolution",
    "triton_poi_fused__to_copy_clone_convolution_mish_mul_squeeze_transpose_unsqueeze_8": "position convolution",
    "triton_poi_fused_new_zeros_4": "position convolution",
    "triton_poi_fused_index_copy_new_zeros_5": "position convolution",
    "triton_poi_fused_cat_3": "GEMM input projection",
    "Memset (Device)": "other",
    "nvjet_sm90_hsh_128x272_64x4_2x1_v_bz_coopA_bias_TNT": "other",  # a GEMM whose op is unknown: no shapes
}


@pytest.mark.parametrize("name", list(PROFILED_KERNELS))
def test_profiled_kernel_names_fall_into_their_kinds(name):
    assert bench.step_kind(TINY, 110, 3, name) == PROFILED_KERNELS[name]
    # inductor launches each of its kernels in a profiler range of the kernel's name: the op the kernel links to
    assert bench.step_kind(TINY, 110, 3, name, op=name) == PROFILED_KERNELS[name]


def test_gemm_kernels_take_the_kind_of_the_shapes_of_their_op():
    d, tokens, sequences = TINY.dim, 110, 3
    kernel = "nvjet_sm90_hsh_128x272_64x4_2x1_v_bz_coopA_bias_TNT"
    assert bench.step_kind(TINY, tokens, sequences, kernel, "aten::addmm",
                           [[3 * d], [tokens, d], [d, 3 * d], [], []]) == "GEMM q/k/v + out"
    assert bench.step_kind(TINY, tokens, sequences, kernel, "aten::_addmm_activation",
                           [[2 * d], [tokens, d], [d, 2 * d], [], [], []]) == "GEMM feed-forward"
    assert bench.step_kind(TINY, tokens, sequences, kernel, "aten::mm", [[sequences, d], [d, 6 * d]]) \
        == "time embedding + modulation"
    assert bench.step_kind(TINY, tokens, sequences, kernel, "aten::mm", [[tokens, d], [d, 7]]) == "other"
    assert bench.step_kind(TINY, tokens, sequences, "cutlass_tensorop_f16_s16816fprop_analytic",
                           "aten::cudnn_convolution", [[1, d, 200, 1]]) == "position convolution"


def test_norm_bytes_are_the_tensors_each_fused_norm_kernel_reads_and_writes():
    """A hand count for the tiny model: 2 layers x 2 norms, then the output norm, each one inductor kernel."""
    lengths = [5, 7]
    tokens, sequences, d = 12, 2, TINY.dim

    def nbytes(*shapes, dtype=torch.float16):
        return sum(torch.empty(shape, dtype=dtype).nbytes for shape in shapes)

    # reads the residual stream, the sublayer's output, each token's sequence index and the per-sequence gate of the
    # sublayer, shift and scale of the norm; writes the new residual stream and the normed, modulated input
    block_norm = (nbytes((tokens, d), (tokens, d)) + nbytes((tokens,), dtype=torch.int64)
                  + nbytes((sequences, d), (sequences, d), (sequences, d)) + nbytes((tokens, d), (tokens, d)))
    output_norm = block_norm - nbytes((tokens, d))  # no residual stream after it
    assert TINY.depth == 2
    assert bench.step_costs(TINY, lengths)["norms + modulation + residual"] == bench.Cost(
        0, 4 * block_norm + output_norm)


def test_roofline_bounds_each_kind_by_its_ceiling_and_plots(tmp_path):
    costs = {"GEMM q/k/v + out": bench.Cost(2e12, 1e9), "rotary q/k": bench.Cost(0, 4e9), "other": bench.Cost()}
    rows = bench.roofline(costs, {"GEMM q/k/v + out": 4.0, "rotary q/k": 2.0, "other": 0.5}, peak_tflops=800,
                          bandwidth_gbps=4000)
    gemm, rotary, other = rows
    assert (gemm["bound"], gemm["bound_ms"], gemm["roofline_share"]) == ("compute", 2.5, 0.625)
    assert (rotary["bound"], rotary["bound_ms"], rotary["roofline_share"]) == ("memory", 1.0, 0.5)
    assert other["bound_ms"] == 0 and gemm["flop_per_byte"] == 2000
    table = bench.format_roofline(rows).splitlines()
    assert table[-1].split()[:5] == ["total", "2000.0", "5000.0", "400", "6.500"]
    png = bench.plot_roofline([dict(r, requests=n) for n in (2, 8) for r in rows], tmp_path / "roofline.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roofline_summary_of_a_step():
    costs = bench.step_costs(TINY, [40, 60])
    ms_by_kind = {"attention": 0.25, "GEMM feed-forward": 0.5, "other": 0.25}
    ceilings = dict(matmul_tflops=800.0, bandwidth_gbps=4000.0, attention_tflops=500.0)
    summary = bench.roofline_summary(costs, ms_by_kind, 1.25, ceilings)
    flops = sum(cost.flops for cost in costs.values())
    bound = sum(max(c.flops / 800e9, c.bytes / 4000e6) for c in costs.values())
    attention_tflops = costs["attention"].flops / 0.25e-3 / 1e12
    assert summary == pytest.approx(dict(
        step_ms=1.25, kernel_ms=1.0, tflop=flops / 1e12, mfu=flops / 1.25e-3 / 800e12, bound_ms=bound,
        roofline_share=bound / 1.25, attention_tflops=attention_tflops, attention_share_of_peak=attention_tflops / 800,
        attention_share_of_best=attention_tflops / 500))


def test_packed_bench_counts_the_steps_without_a_gpu(tmp_path):
    out = tmp_path / "cost.json"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "packed_bench.py"), "--arch", "tiny",
                           "--requests", "2,3", "--frames", "40", "--count-only", "--json", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    for requests in (2, 3):
        counted = {r["step_kind"]: (r["gflop"], r["mbytes"]) for r in rows if r["requests"] == requests}
        costs = bench.step_costs(TINY, [40] * 2 * requests)  # two sequences a request (classifier-free guidance)
        assert counted == {kind: (cost.flops / 1e9, cost.bytes / 1e6) for kind, cost in costs.items()}
    assert "norms + modulation + residual" in done.stdout and "total" in done.stdout
