"""Export the DiT step and the Vocos decoder to ONNX, and check the files against torch.

* Graphs have dynamic batch and frames axes and the names of `f5_triton.engines.base`; the
  legacy TorchScript exporter (`dynamo=False`) is tried first because its graphs are the ones
  TensorRT's ONNX parser handles best, the dynamo exporter second.
* `fp16=True` exports a half-precision copy whose overflow-prone modules (layer/RMS norms, GRN,
  the ISTFT) stay in fp32, with fp32 inputs and outputs, so callers do not change.
* Every file is verified with onnxruntime through the engine interface against the torch fp32
  module, on several batch sizes and lengths with padded items; the errors are returned and
  written to `export_info.json` beside the files.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from f5_triton.engines.base import DYNAMIC_AXES, EngineConfig, NetworkSpec
from f5_triton.engines.networks import as_network, output_valid_mask, random_inputs
from f5_triton.model.dit import GRN, RMSNorm

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 17
MIN_OPSET = 17
MANIFEST_FILE = "export_info.json"
EXPORTERS = ("auto", "legacy", "dynamo")
# Traced with one padded item; verified at other batch sizes and lengths, so nothing of the trace's
# shapes can hide in the graph.
EXPORT_LENGTHS = (64, 48)
VERIFY_CASES: tuple[tuple[int, ...], ...] = ((23,), (130, 77), (211, 190, 64, 9))


class ExportError(RuntimeError):
    """No exporter produced a graph, or the graph does not match the network."""


# ---------------------------------------------------------------------------------------------
# Half precision with fp32 islands


class Float32Island(nn.Module):
    """Runs `inner` in fp32 inside a half-precision network: floating inputs cast up, output cast back.

    `cast_back=False` keeps the fp32 output (for the ISTFT, whose division by a tiny window
    envelope near an item's end can exceed the fp16 range before the result is masked).
    """

    def __init__(self, inner: nn.Module, cast_back: bool = True):
        super().__init__()
        self.inner = inner.float()
        self.cast_back = cast_back

    def __getattr__(self, name: str):
        # the wrapped module's attributes (ISTFT.hop_length, ...) stay readable through the island
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner":
                raise
            return getattr(self.inner, name)

    def forward(self, *args):
        dtype = next(a.dtype for a in args if torch.is_tensor(a) and a.is_floating_point())
        args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        out = self.inner(*args)
        return out.to(dtype) if self.cast_back else out


def _fp32_island(module: nn.Module) -> Float32Island | None:
    """The island for modules that overflow or lose too much in fp16 (sums of squares over a row/sequence)."""
    from f5_triton.vocoder import ISTFT

    if isinstance(module, ISTFT):
        return Float32Island(module, cast_back=False)
    if isinstance(module, (nn.LayerNorm, RMSNorm, GRN)):
        return Float32Island(module)
    return None


class HalfIO(nn.Module):
    """A half-precision network with the fp32 inputs/outputs of its spec."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network
        self.spec: NetworkSpec = network.spec
        self.static_sizes: dict[str, int] = network.static_sizes

    def forward(self, *inputs):
        inputs = [t.half() if t.is_floating_point() else t for t in inputs]
        return self.network(*inputs).float()


def half_with_fp32_islands(network: nn.Module) -> HalfIO:
    """A copy of `network` in fp16, except overflow-prone modules; buffers (rotary frequencies,
    ISTFT bases) stay fp32 because the modules that read them compute in fp32."""
    network = copy.deepcopy(network)
    stack = [network]
    while stack:
        module = stack.pop()
        for name, child in module.named_children():
            island = _fp32_island(child)
            if island is not None:
                setattr(module, name, island)
            else:
                stack.append(child)
        for param in module.parameters(recurse=False):
            param.data = param.data.half()
    return HalfIO(network.eval())


# ---------------------------------------------------------------------------------------------
# Exporters


@contextlib.contextmanager
def _legacy_exporter_fixes(opset: int) -> Iterator[None]:
    """Work around a legacy-exporter bug for the duration of one export.

    Its `repeat_interleave` symbolic adds the rank to a negative `dim` in place, on the traced
    constant itself; the tracer shares that constant with every other -1 of the graph, so the
    DiT's `view(b, -1, heads, dim_head)` (traced before the rotary embedding's
    `repeat_interleave(2, dim=-1)`) silently becomes `view(b, 1, ...)`. The fix hands the
    original symbolic a private copy of `dim`.
    """
    from torch.onnx import symbolic_helper, symbolic_opset13

    def repeat_interleave(g, self, repeats, dim=None, output_size=None):
        if not symbolic_helper._is_none(dim):
            dim = g.op("Constant", value_t=torch.tensor(symbolic_helper._get_const(dim, "i", "dim")))
        return symbolic_opset13.repeat_interleave(g, self, repeats, dim, output_size)

    torch.onnx.register_custom_op_symbolic("aten::repeat_interleave", repeat_interleave, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::repeat_interleave", opset)


def _export_legacy(network: nn.Module, example: tuple, path: Path, opset: int) -> None:
    spec = network.spec
    with _legacy_exporter_fixes(opset), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is deprecated, still the best for TensorRT
        torch.onnx.export(network, example, str(path), dynamo=False, opset_version=opset,
                          input_names=list(spec.input_names), output_names=list(spec.output_names),
                          dynamic_axes=_dynamic_axes(spec), do_constant_folding=True)


def _export_dynamo(network: nn.Module, example: tuple, path: Path, opset: int) -> None:
    spec = network.spec
    dims = {name: torch.export.Dim(name) for name in DYNAMIC_AXES}
    dynamic_shapes = tuple({axis: dims[name] for axis, name in t.dynamic_axes().items()} for t in spec.inputs)
    torch.onnx.export(network, example, str(path), dynamo=True, opset_version=max(opset, 18),
                      input_names=list(spec.input_names), output_names=list(spec.output_names),
                      dynamic_shapes=dynamic_shapes, optimize=True, verbose=False)


_EXPORTER_FUNCTIONS: dict[str, Callable[[nn.Module, tuple, Path, int], None]] = {
    "legacy": _export_legacy, "dynamo": _export_dynamo}


def _dynamic_axes(spec: NetworkSpec) -> dict[str, dict[int, str]]:
    return {t.name: t.dynamic_axes() for t in (*spec.inputs, *spec.outputs)}


def export_onnx(network: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET, exporter: str = "auto") -> str:
    """Write `network` (a module with `.spec` and `.static_sizes`) to `path`; returns the exporter used."""
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (LayerNormalization), got {opset}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = tuple(random_inputs(network.spec, EXPORT_LENGTHS, network.static_sizes))
    failures = []
    for name in ("legacy", "dynamo") if exporter == "auto" else (exporter,):
        try:
            with torch.no_grad():
                _EXPORTER_FUNCTIONS[name](network.eval(), example, path, opset)
            check_onnx(path, network.spec, opset)
            return name
        except Exception as exc:  # exporters raise anything from tracing, symbolic or checker errors
            failures.append(f"{name} exporter: {type(exc).__name__}: {exc}")
            logger.warning("%s: %s", network.spec.name, failures[-1])
    raise ExportError(f"cannot export {network.spec.name} to ONNX: " + "; ".join(failures))


def check_onnx(path: str | Path, spec: NetworkSpec, min_opset: int = MIN_OPSET) -> None:
    """Raise ExportError unless the file is valid ONNX with the spec's names, an opset >= `min_opset`
    and symbolic (not fixed) dynamic axes."""
    import onnx

    onnx.checker.check_model(str(path))  # by path: works above the 2 GB protobuf limit too
    model = onnx.load(str(path), load_external_data=False)
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < min_opset:
        raise ExportError(f"{path}: opset {opset} < {min_opset}")
    graph_inputs = {i.name: i for i in model.graph.input}
    graph_outputs = {o.name: o for o in model.graph.output}
    if tuple(graph_inputs) != spec.input_names or tuple(graph_outputs)[:1] != spec.output_names:
        raise ExportError(f"{path}: inputs {tuple(graph_inputs)} / outputs {tuple(graph_outputs)}, expected "
                          f"{spec.input_names} / {spec.output_names}")
    for tensor_spec in (*spec.inputs, *spec.outputs):
        node = graph_inputs.get(tensor_spec.name) or graph_outputs[tensor_spec.name]
        dims = node.type.tensor_type.shape.dim
        for axis in tensor_spec.dynamic_axes():
            if dims[axis].HasField("dim_value"):
                raise ExportError(f"{path}: {tensor_spec.name} axis {axis} ({tensor_spec.axes[axis]}) is fixed "
                                  f"to {dims[axis].dim_value}")


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass
class ErrorRow:
    """Max abs error of one verification batch over its valid (unpadded) outputs."""

    lengths: tuple[int, ...]
    max_abs_err: float
    max_abs_ref: float

    def as_dict(self) -> dict:
        return {"batch": len(self.lengths), "lengths": list(self.lengths), "max_abs_err": self.max_abs_err,
                "max_abs_ref": self.max_abs_ref}


def verify_onnx(path: str | Path, reference: nn.Module,
                cases: Sequence[Sequence[int]] = VERIFY_CASES) -> list[ErrorRow]:
    """Run `path` in onnxruntime (CPU) through the engine interface; compare with the fp32 torch module."""
    from f5_triton.engines.onnxruntime_engine import OnnxRuntimeEngine

    reference = as_network(reference).eval()
    spec = reference.spec
    engine = OnnxRuntimeEngine(spec, EngineConfig(kind="onnxruntime", path=str(path)))
    rows = []
    for seed, lengths in enumerate(cases):
        inputs = random_inputs(spec, lengths, reference.static_sizes, seed=seed)
        with torch.inference_mode():
            expected = reference(*inputs).float()
        got = engine(*inputs).float()
        if got.shape != expected.shape:
            raise ExportError(f"{path}: output shape {tuple(got.shape)} for lengths {tuple(lengths)}, "
                              f"torch gives {tuple(expected.shape)}")
        keep = output_valid_mask(spec, expected, lengths).expand_as(expected)
        rows.append(ErrorRow(tuple(lengths), float((got - expected).abs()[keep].max()),
                             float(expected.abs()[keep].max())))
    return rows


# ---------------------------------------------------------------------------------------------
# Export + verify + manifest


@dataclass
class ExportedNetwork:
    """One written ONNX file and what was measured on it."""

    spec: NetworkSpec
    path: Path
    precision: str  # "fp32" | "fp16" (weights; inputs and outputs are fp32 either way)
    exporter: str
    opset: int
    static_sizes: dict[str, int]
    errors: list[ErrorRow] = field(default_factory=list)

    @property
    def max_abs_err(self) -> float:
        return max((row.max_abs_err for row in self.errors), default=float("nan"))

    def manifest(self) -> dict[str, Any]:
        def tensors(specs):
            return [{"name": t.name, "dtype": str(t.dtype).removeprefix("torch."), "axes": list(t.axes),
                     "shape": [-1 if a in t.dynamic_axes().values() else self.static_sizes[a] for a in t.axes]}
                    for t in specs]

        return {"network": self.spec.name, "file": self.path.name, "precision": self.precision,
                "exporter": self.exporter, "opset": self.opset, "inputs": tensors(self.spec.inputs),
                "outputs": tensors(self.spec.outputs), "batch_per_request": self.spec.batch_per_request,
                "samples_per_frame": self.spec.samples_per_frame,
                "frames_without_samples": self.spec.frames_without_samples, "max_abs_err": self.max_abs_err,
                "errors": [row.as_dict() for row in self.errors]}


def onnx_file_name(spec: NetworkSpec, precision: str) -> str:
    return spec.onnx_file if precision == "fp32" else f"{spec.name}.{precision}.onnx"


def export_network(module: nn.Module, output_dir: str | Path, *, precision: str = "fp32", opset: int = DEFAULT_OPSET,
                   exporter: str = "auto", cases: Sequence[Sequence[int]] = VERIFY_CASES) -> ExportedNetwork:
    """Export one network (DiT, VocosDecoder or a network module) in fp32 or fp16 and verify it."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
    network = as_network(module).eval()
    to_export = half_with_fp32_islands(network) if precision == "fp16" else network
    path = Path(output_dir) / onnx_file_name(network.spec, precision)
    used = export_onnx(to_export, path, opset=opset, exporter=exporter)
    del to_export
    return ExportedNetwork(network.spec, path, precision, used, opset, dict(network.static_sizes),
                           verify_onnx(path, network, cases))


def format_error_table(results: Sequence[ExportedNetwork]) -> str:
    """Max abs error vs torch fp32 per file and verification batch, as a text table."""
    lines = [f"{'file':<22} {'batch':>5}  {'lengths (frames)':<22} {'max|err|':>10} {'max|ref|':>10}"]
    for result in results:
        for row in result.errors:
            lengths = ",".join(map(str, row.lengths))
            lines.append(f"{result.path.name:<22} {len(row.lengths):>5}  {lengths:<22} "
                         f"{row.max_abs_err:>10.3e} {row.max_abs_ref:>10.3e}")
    return "\n".join(lines)


def export_models(modules: Sequence[nn.Module], output_dir: str | Path, *, fp16: bool = False,
                  opset: int = DEFAULT_OPSET, exporter: str = "auto", cases: Sequence[Sequence[int]] = VERIFY_CASES,
                  metadata: dict[str, Any] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export each network in fp32 (and fp16 with `fp16`), verify, and write `export_info.json`.

    Returns the manifest: torch version, metadata, and per file its names, shapes and errors.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for module in modules:
        for precision in ("fp32", "fp16") if fp16 else ("fp32",):
            name = as_network(module).spec.name
            log(f"exporting {name} ({precision}, opset {opset}) ...")
            results.append(export_network(module, output_dir, precision=precision, opset=opset,
                                          exporter=exporter, cases=cases))
            log(f"  wrote {results[-1].path} with the {results[-1].exporter} exporter, "
                f"max abs err vs torch fp32: {results[-1].max_abs_err:.3e}")
    log(format_error_table(results))
    manifest = {"torch": torch.__version__, "opset": opset, **(metadata or {}),
                "files": {r.path.name: r.manifest() for r in results}}
    (output_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {output_dir / MANIFEST_FILE}")
    return manifest


def export_checkpoint(ckpt: str | Path, vocab: str | Path, vocoder: str | Path, output_dir: str | Path, *,
                      networks: Sequence[str] = ("dit_step", "vocoder"), arch: str | None = None,
                      fp16: bool = False, opset: int = DEFAULT_OPSET, exporter: str = "auto",
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load a checkpoint's `networks` (dit_step: the DiT step; vocoder: Vocos) and :func:`export_models` them."""
    import dataclasses

    from f5_triton.checkpoints import load_dit
    from f5_triton.text import Tokenizer
    from f5_triton.vocoder import VocosDecoder, load_vocos

    modules: list[nn.Module] = []
    metadata: dict[str, Any] = {"checkpoint": str(ckpt), "vocoder": str(vocoder)}
    if "dit_step" in networks:
        dit = load_dit(ckpt, Tokenizer(vocab).vocab_size, arch=arch)
        metadata["architecture"] = dataclasses.asdict(dit.config)
        modules.append(dit)
    if "vocoder" in networks:
        modules.append(VocosDecoder(load_vocos(vocoder)).eval())
    return export_models(modules, output_dir, fp16=fp16, opset=opset, exporter=exporter, metadata=metadata, log=log)
