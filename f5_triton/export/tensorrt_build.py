"""Build TensorRT engines (.plan) from the exported ONNX networks, with the TensorRT Python API.

FP16 everywhere except the layers that overflow or lose too much in half precision, which are
pinned to FP32 (`layer.precision` + OBEY_PRECISION_CONSTRAINTS): normalizations, reductions, pow,
softmax (optional, see `BuildOptions.fp32_softmax`), exp/sin/cos (time and rotary embeddings,
Vocos' magnitude and phase) and the whole ISTFT.

Shape limits are given in *requests* and frames: the DiT step runs the conditional and the
unconditional (CFG) branches of a request as one batch, so its batch axis is twice the requests
(its minimum stays one request, for calls without guidance). Defaults fit a Jetson Orin 8 GB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from f5_triton.engines.base import NetworkSpec
from f5_triton.engines.tensorrt_engine import import_tensorrt

# Layers kept in FP32 by type; and by part of the name of the ONNX node they come from (the legacy
# exporter names nodes after module paths: "/model/time_embed/Sin", "/decoder/istft/Div",
# "/model/transformer_blocks.0/attn/q_norm/Pow" for a norm it decomposes).
FP32_LAYER_TYPES = ("NORMALIZATION", "REDUCE")
FP32_UNARY_OPS = ("EXP", "LOG", "SIN", "COS", "SQRT", "RECIP")
FP32_ELEMENTWISE_OPS = ("POW",)
FP32_NAME_PARTS = ("/istft/", "/time_embed/", "/rotary_embed/", "_norm/", "/grn/")


@dataclass(frozen=True)
class ShapeRange:
    """min <= opt <= max of one dynamic axis in the optimization profile."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min <= opt <= max, got {self.min}, {self.opt}, {self.max}")

    def scaled(self, factor: int, keep_min: bool = False) -> "ShapeRange":
        return ShapeRange(self.min if keep_min else self.min * factor, self.opt * factor, self.max * factor)


@dataclass
class BuildOptions:
    """Profile, precision and builder resources of an engine build."""

    requests: ShapeRange = ShapeRange(1, 1, 4)
    frames: ShapeRange = ShapeRange(1, 1024, 4096)  # 4096 frames = Limits.max_mel_frames (~43.7 s)
    fp16: bool = True
    workspace_gib: float = 1.0
    timing_cache: Path | None = None
    # Softmax in FP32 is the safe choice, but it likely keeps TensorRT from fusing attention into one
    # FP16 kernel, which then holds [batch, heads, frames, frames] scores in memory (GBs at 4096 frames).
    fp32_softmax: bool = True
    verbose: bool = False


def batch_range(spec: NetworkSpec, requests: ShapeRange) -> ShapeRange:
    """The network's batch axis for `requests`: doubled for the DiT step (CFG), minimum one request."""
    return requests.scaled(spec.batch_per_request, keep_min=True)


def profile_shapes(spec: NetworkSpec, static_shapes: dict[str, tuple[int, ...]],
                   options: BuildOptions) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shape of each input; static axes are read from the ONNX inputs' shapes."""
    ranges = {"batch": batch_range(spec, options.requests), "frames": options.frames}
    shapes = {}
    for tensor in spec.inputs:
        picks = []
        for which in ("min", "opt", "max"):
            shape = []
            for axis, name in enumerate(tensor.axes):
                if name in ranges:
                    shape.append(getattr(ranges[name], which))
                elif static_shapes[tensor.name][axis] > 0:
                    shape.append(static_shapes[tensor.name][axis])
                else:
                    raise ValueError(f"{spec.name}: axis {axis} ({name}) of {tensor.name} is dynamic in the ONNX "
                                     f"graph but fixed in the network spec; re-export with scripts/export_onnx.py")
            picks.append(tuple(shape))
        shapes[tensor.name] = tuple(picks)
    return shapes


def _keep_fp32(trt, layer, fp32_softmax: bool) -> bool:
    """Whether a layer belongs to the FP32 set (only layers computing on floats qualify)."""
    floats = (trt.float32, trt.float16)
    tensors = [layer.get_input(i) for i in range(layer.num_inputs)] + [layer.get_output(i) for i in range(layer.num_outputs)]
    if any(t is not None and t.dtype not in floats for t in tensors) or layer.num_outputs == 0:
        return False
    if any(part in layer.name for part in FP32_NAME_PARTS):
        return True
    kind = layer.type
    if kind in [getattr(trt.LayerType, name) for name in FP32_LAYER_TYPES]:
        return True
    if kind == trt.LayerType.SOFTMAX:
        return fp32_softmax
    if kind == trt.LayerType.UNARY:
        layer.__class__ = trt.IUnaryLayer  # the Python binding hands out ILayer: downcast to read .op
        return layer.op in [getattr(trt.UnaryOperation, op) for op in FP32_UNARY_OPS]
    if kind == trt.LayerType.ELEMENTWISE:
        layer.__class__ = trt.IElementWiseLayer
        return layer.op in [getattr(trt.ElementWiseOperation, op) for op in FP32_ELEMENTWISE_OPS]
    return False


def pin_fp32_layers(trt, network, fp32_softmax: bool = True) -> list[str]:
    """Set FP32 precision (and FP32 outputs) on the overflow-prone layers; returns their names."""
    pinned = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if _keep_fp32(trt, layer, fp32_softmax):
            layer.precision = trt.float32
            for i in range(layer.num_outputs):
                layer.set_output_type(i, trt.float32)
            pinned.append(layer.name)
    return pinned


def _progress_monitor(trt, log: Callable[[str], None]):
    """An IProgressMonitor printing builder phases (TensorRT >= 10), or None where there is none."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class PhasePrinter(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, tuple[float, int]] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = self.started[parent_phase][1] + 1 if parent_phase in self.started else 0
            self.started[phase_name] = (time.monotonic(), depth)
            log(f"[trt] {'  ' * depth}{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            start, depth = self.started.pop(phase_name, (time.monotonic(), 0))
            if depth == 0:
                log(f"[trt] {phase_name} done in {time.monotonic() - start:.1f} s")

    return PhasePrinter()


def _parse_onnx(trt, builder, logger, onnx_path: Path):
    major = int(trt.__version__.split(".")[0])
    # explicit batch is the only mode in TensorRT 10 (the flag is deprecated there)
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: finds external weight files beside it
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}:\n{errors}")
    return network, parser


def build_engine(onnx_path: str | Path, plan_path: str | Path, spec: NetworkSpec, options: BuildOptions,
                 log: Callable[[str], None] = print) -> Path:
    """Build and write one engine; raises EngineUnavailable without TensorRT, RuntimeError if the build fails."""
    trt = import_tensorrt()
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} does not exist (make it with scripts/export_onnx.py)")
    started = time.monotonic()
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)

    log(f"[{spec.name}] parsing {onnx_path} (TensorRT {trt.__version__})")
    network, _parser = _parse_onnx(trt, builder, logger, onnx_path)  # the parser must outlive the build
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if tuple(inputs) != spec.input_names:
        raise RuntimeError(f"{onnx_path} has inputs {tuple(inputs)}, expected {spec.input_names}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(spec, inputs, options).items():
        profile.set_shape(name, low, opt, high)
        log(f"[{spec.name}] profile {name}: min {low} opt {opt} max {high}")
    config.add_optimization_profile(profile)

    if options.fp16:
        if not getattr(builder, "platform_has_fast_fp16", True):
            log(f"[{spec.name}] warning: this GPU has no fast FP16; building FP16 anyway")
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_fp32_layers(trt, network, options.fp32_softmax)
        log(f"[{spec.name}] FP16, {len(pinned)} of {network.num_layers} layers pinned to FP32")

    cache_data = b""
    if options.timing_cache is not None and Path(options.timing_cache).is_file():
        cache_data = Path(options.timing_cache).read_bytes()
        log(f"[{spec.name}] timing cache {options.timing_cache} ({len(cache_data)} bytes)")
    cache = config.create_timing_cache(cache_data)
    config.set_timing_cache(cache, ignore_mismatch=False)

    monitor = _progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    log(f"[{spec.name}] building (minutes for the DiT) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {spec.name} from {onnx_path} (see the TensorRT log above)")

    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(memoryview(serialized))
    if options.timing_cache is not None:
        Path(options.timing_cache).parent.mkdir(parents=True, exist_ok=True)
        Path(options.timing_cache).write_bytes(memoryview(config.get_timing_cache().serialize()))
    log(f"[{spec.name}] wrote {plan_path} ({plan_path.stat().st_size / 2**20:.1f} MiB) "
        f"in {time.monotonic() - started:.0f} s")
    return plan_path
