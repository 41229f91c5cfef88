"""ONNX export of the DiT step and Vocos, verified with onnxruntime (TensorRT builds: test_tensorrt.py).

Tolerances (max abs error over valid frames, vs the torch fp32 module):
  fp32 files: 1e-4 (DiT step, outputs ~1) and 1e-5 (vocoder, waveform ~0.1)
  fp16 files: 2e-2 (DiT step) and 1e-3 (vocoder)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from f5_triton.checkpoints import random_dit
from f5_triton.config import ARCHITECTURES
from f5_triton.engines import DIT_STEP, VOCODER, DiTStep, VocoderNetwork
from f5_triton.engines.networks import output_valid_mask, random_inputs
from f5_triton.export.onnx_export import (
    MANIFEST_FILE,
    export_models,
    export_network,
    half_with_fp32_islands,
)
from f5_triton.model.dit import ROTARY_TABLE_POSITIONS

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = {("dit_step", "fp32"): 1e-4, ("vocoder", "fp32"): 1e-5, ("dit_step", "fp16"): 2e-2,
             ("vocoder", "fp16"): 1e-3}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, dit, decoder):
    out = tmp_path_factory.mktemp("onnx")
    manifest = export_models([dit, decoder], out, fp16=True, log=lambda line: None)
    return out, manifest


def run_onnx(path: Path, inputs) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return torch.from_numpy(session.run(None, feed)[0])


def test_files_manifest_and_measured_errors(exported):
    out, manifest = exported
    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    files = manifest["files"]
    assert set(files) == {"dit_step.onnx", "dit_step.fp16.onnx", "vocoder.onnx", "vocoder.fp16.onnx"}
    for name, entry in files.items():
        spec = DIT_STEP if entry["network"] == "dit_step" else VOCODER
        assert (out / name).is_file()
        assert [t["name"] for t in entry["inputs"]] == list(spec.input_names)
        assert [t["name"] for t in entry["outputs"]] == list(spec.output_names)
        assert entry["exporter"] == "legacy" and entry["opset"] >= 17
        assert len(entry["errors"]) >= 3 and {row["batch"] for row in entry["errors"]} >= {1, 2, 4}
        assert entry["max_abs_err"] <= TOLERANCE[(entry["network"], entry["precision"])], entry
    assert files["dit_step.onnx"]["inputs"][2]["shape"] == [-1, -1, 32]  # tiny text_dim
    assert files["dit_step.onnx"]["batch_per_request"] == 2


def test_graphs_have_opset_17_and_symbolic_batch_and_frames(exported):
    out, _ = exported
    for spec in (DIT_STEP, VOCODER):
        model = onnx.load(str(out / spec.onnx_file))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        for tensor_spec, node in zip(spec.inputs, model.graph.input):
            dims = node.type.tensor_type.shape.dim
            for axis in tensor_spec.dynamic_axes():
                assert dims[axis].dim_param and not dims[axis].HasField("dim_value")
        types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
        if spec is DIT_STEP:
            assert types["mask"] == onnx.TensorProto.BOOL and types["time"] == onnx.TensorProto.FLOAT
            # the loaded DiT holds a rotary table (optimize_for); the graph computes the angles instead, so that
            # frames past the table's rows still run
            constants = [*model.graph.initializer,
                         *(a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value")]
            assert not [t.dims for t in constants if ROTARY_TABLE_POSITIONS in t.dims]


@pytest.mark.parametrize("lengths", [(1,), (2, 1), (300,), (257, 3, 100, 200, 5)])
def test_any_length_and_batch_runs_with_padding_masks(exported, dit, decoder, lengths):
    """Lengths unlike the trace's (64, 48): a length baked into the graph would fail or differ here."""
    out, _ = exported
    for network in (DiTStep(dit), VocoderNetwork(decoder)):
        spec = network.spec
        inputs = random_inputs(spec, lengths, network.static_sizes, seed=len(lengths))
        with torch.inference_mode():
            expected = network(*inputs)
        got = run_onnx(out / spec.onnx_file, inputs)
        keep = output_valid_mask(spec, expected, lengths).expand_as(expected)
        assert got.shape == expected.shape
        errors = (got - expected).abs()[keep]
        assert errors.numel() == 0 or errors.max() <= TOLERANCE[(spec.name, "fp32")]  # 1 frame: no samples


def test_fp16_files_keep_fp32_inputs_and_outputs(exported):
    out, _ = exported
    for spec in (DIT_STEP, VOCODER):
        model = onnx.load(str(out / f"{spec.name}.fp16.onnx"))
        float_io = [t for t in (*model.graph.input, *model.graph.output)
                    if t.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        assert all(t.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for t in float_io)
        weights = {init.data_type for init in model.graph.initializer if init.dims and max(init.dims) > 8}
        assert onnx.TensorProto.FLOAT16 in weights


def test_fp16_copy_keeps_islands_and_buffers_in_fp32(dit):
    half = half_with_fp32_islands(DiTStep(dit))
    block = half.network.model.transformer_blocks[0]
    assert block.attn.qkv_weight.dtype == torch.float16
    assert block.ff_norm.inner.__class__.__name__ == "LayerNorm"  # inside a Float32Island
    assert half.network.model.rotary_embed.inv_freq.dtype == torch.float32
    assert dit.transformer_blocks[0].attn.qkv_weight.dtype == torch.float32  # the original is untouched


@pytest.mark.parametrize("variant,exporter", [
    ({"text_mask_padding": False, "pe_attn_head": 1}, "legacy"),  # F5TTS_Base / F5TTS_Small (v0) structure
    ({"conv_layers": 0}, "legacy"),
    # in no released model; the legacy exporter has no aten::rms_norm below opset 23, "auto" falls back
    ({"qk_norm": "rms_norm"}, "dynamo"),
])
def test_every_architecture_variant_exports(tmp_path, variant, exporter):
    model = random_dit(ARCHITECTURES["tiny"].replace(**variant), seed=2)
    result = export_network(model, tmp_path, cases=((9,), (40, 21)))
    assert result.exporter == exporter
    assert result.max_abs_err <= TOLERANCE[("dit_step", "fp32")]


def test_dynamo_exporter_works_as_the_fallback(tmp_path, dit):
    result = export_network(dit, tmp_path, exporter="dynamo", cases=((17,), (30, 12)))
    assert result.exporter == "dynamo"
    assert result.max_abs_err <= TOLERANCE[("dit_step", "fp32")]


def test_f5tts_v1_small_architecture_exports_and_runs(tmp_path):
    """The released F5TTS_v1_Small architecture at full depth (18 blocks), random weights: ~20 s, 600 MB file."""
    model = random_dit(ARCHITECTURES["F5TTS_v1_Small"], seed=0)
    result = export_network(model, tmp_path, cases=((50,), (64, 31)))
    try:
        assert result.path.stat().st_size > 500e6
        assert result.max_abs_err <= 1e-3, result.errors
    finally:
        result.path.unlink()  # pytest keeps the last runs' temporary folders


def test_export_script(tiny_ckpt, tmp_path):
    out = tmp_path / "onnx"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export_onnx.py"), "--ckpt-dir", str(tiny_ckpt),
                           "--output-dir", str(out), "--opset", "17", "--fp16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "max|err|" in proc.stdout
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    for name in ("dit_step.onnx", "dit_step.fp16.onnx", "vocoder.onnx", "vocoder.fp16.onnx"):
        assert (out / name).is_file() and manifest["files"][name]["max_abs_err"] <= TOLERANCE[
            (manifest["files"][name]["network"], manifest["files"][name]["precision"])]
    assert manifest["architecture"]["dim"] == ARCHITECTURES["tiny"].dim


def test_export_script_rejects_missing_model(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "export_onnx.py"), "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--ckpt-dir" in proc.stderr
