"""Build TensorRT engines (.plan) from the exported ONNX networks: strongly typed, either TensorRT flavour.

Precision comes from the ONNX graph, not from the builder: the network is created STRONGLY_TYPED and
no precision flag (FP16, OBEY_PRECISION_CONSTRAINTS, ...) or per-layer precision is set. An fp16 plan
is built from the fp16 export (`*.fp16.onnx`: fp16 weights and matmuls, fp32 islands for norms,
time/rotary embeddings and the vocoder's ISTFT, fp32 inputs and outputs), an fp32 plan from the fp32
export. This is the only mode of TensorRT 11.x and TensorRT-RTX, and exists since TensorRT 9.

Shape limits are given in *requests* and frames: the DiT step runs the conditional and the
unconditional (CFG) branches of a request as one batch, so its batch axis is twice the requests
(its minimum stays one request, for calls without guidance). Defaults fit a Jetson Orin 8 GB.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from f5_triton.engines.base import NETWORKS, NetworkSpec
from f5_triton.engines.tensorrt_engine import describe, flavour_of, import_tensorrt

BUILD_INFO_FILE = "build_info.json"  # scripts/build_engines.py: each network's BuildReport, beside the plans

# Builder flags of weakly typed builds (TensorRT <= 10): a strongly typed build sets none of them.
PRECISION_FLAGS = ("FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                   "PREFER_PRECISION_CONSTRAINTS")


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
    """Profile, TensorRT flavour and builder resources of an engine build (precision is the ONNX file's)."""

    requests: ShapeRange = ShapeRange(1, 1, 4)
    frames: ShapeRange = ShapeRange(1, 1024, 4096)  # 4096 frames = Limits.max_mel_frames (~43.7 s)
    tensorrt: str | None = None  # "tensorrt", "tensorrt-rtx", or None: $F5_TENSORRT, else whichever imports
    workspace_gib: float = 1.0
    timing_cache: Path | None = None  # TensorRT only (TensorRT-RTX tunes at run time and has none)
    verbose: bool = False


@dataclass(frozen=True)
class TensorInfo:
    """A network input or output as the builder sees it: -1 marks a dynamic axis."""

    name: str
    dtype: str  # TensorRT's DataType name: FLOAT, HALF, BOOL, INT64, ...
    shape: tuple[int, ...]


@dataclass
class BuildReport:
    """What the builder was given and what it reports about the network, without running the plan."""

    plan: Path
    tensorrt: str  # "TensorRT 10.8.0.43" / "TensorRT-RTX 1.7.1.116"
    flavour: str  # "tensorrt" / "tensorrt-rtx"
    strongly_typed: bool
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # read back from the profile
    builder_flags: tuple[str, ...]  # BuilderFlag names set in the config
    layers: int
    half_layers: int  # layers with an FP16 output: the precision the ONNX graph asked for
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "plan": str(self.plan)}


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


def _progress_monitor(trt, log: Callable[[str], None]):
    """An IProgressMonitor printing builder phases, or None where there is none."""
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


def is_strongly_typed(trt, network) -> bool:
    """Whether `network` is strongly typed: by its flag; always where the flag is gone or ignored (11.x)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None or (flavour_of(trt) == "tensorrt" and int(trt.__version__.split(".")[0]) >= 11):
        return True
    return bool(network.get_flag(flag))


def create_strongly_typed_network(trt, builder):
    """An empty STRONGLY_TYPED network (explicit batch is implied since TensorRT 10; 11.x ignores the flag)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    if not is_strongly_typed(trt, network):
        raise RuntimeError(f"{describe(trt)} did not create a strongly typed network")
    return network


def _parse_onnx(trt, builder, logger, onnx_path: Path):
    network = create_strongly_typed_network(trt, builder)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file: finds external weight files beside it
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{describe(trt)}'s ONNX parser rejected {onnx_path}:\n{errors}")
    return network, parser


def _tensors(trt, network, outputs: bool) -> tuple[TensorInfo, ...]:
    count, get = (network.num_outputs, network.get_output) if outputs else (network.num_inputs, network.get_input)
    return tuple(TensorInfo(t.name, t.dtype.name, tuple(t.shape)) for t in map(get, range(count)))


def _half_layers(trt, network) -> int:
    half = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        half += any(layer.get_output(i).dtype == trt.float16 for i in range(layer.num_outputs))
    return half


def _set_flags(trt, config) -> tuple[str, ...]:
    return tuple(name for name, flag in trt.BuilderFlag.__members__.items() if config.get_flag(flag))


def build_engine(onnx_path: str | Path, plan_path: str | Path, spec: NetworkSpec, options: BuildOptions,
                 log: Callable[[str], None] = print) -> BuildReport:
    """Build and write one engine; raises EngineUnavailable without TensorRT, RuntimeError if the build fails."""
    trt = import_tensorrt(options.tensorrt)
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} does not exist (make it with scripts/export_onnx.py)")
    started = time.monotonic()
    logger = trt.Logger(trt.Logger.VERBOSE if options.verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)

    log(f"[{spec.name}] parsing {onnx_path} ({describe(trt)}, strongly typed)")
    network, _parser = _parse_onnx(trt, builder, logger, onnx_path)  # the parser must outlive the build
    inputs = _tensors(trt, network, outputs=False)
    if tuple(t.name for t in inputs) != spec.input_names:
        raise RuntimeError(f"{onnx_path} has inputs {tuple(t.name for t in inputs)}, expected {spec.input_names}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes(spec, {t.name: t.shape for t in inputs}, options).items():
        profile.set_shape(name, low, opt, high)
        log(f"[{spec.name}] profile {name}: min {low} opt {opt} max {high}")
    config.add_optimization_profile(profile)
    half = _half_layers(trt, network)
    log(f"[{spec.name}] precision from the ONNX graph: {half} of {network.num_layers} layers compute in FP16")

    use_timing_cache = options.timing_cache is not None and flavour_of(trt) == "tensorrt"
    if use_timing_cache:
        cache_data = b""
        if Path(options.timing_cache).is_file():
            cache_data = Path(options.timing_cache).read_bytes()
            log(f"[{spec.name}] timing cache {options.timing_cache} ({len(cache_data)} bytes)")
        config.set_timing_cache(config.create_timing_cache(cache_data), ignore_mismatch=False)

    monitor = _progress_monitor(trt, log)
    if monitor is not None:
        config.progress_monitor = monitor
    log(f"[{spec.name}] building (minutes for the DiT) ...")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{describe(trt)} failed to build {spec.name} from {onnx_path} (see its log above)")

    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(memoryview(serialized))
    if use_timing_cache:
        Path(options.timing_cache).parent.mkdir(parents=True, exist_ok=True)
        Path(options.timing_cache).write_bytes(memoryview(config.get_timing_cache().serialize()))
    report = BuildReport(
        plan=plan_path, tensorrt=describe(trt), flavour=flavour_of(trt),
        strongly_typed=is_strongly_typed(trt, network), inputs=inputs,
        outputs=_tensors(trt, network, outputs=True),
        profile={t.name: tuple(tuple(profile.get_shape(t.name)[i]) for i in range(3)) for t in inputs},
        builder_flags=_set_flags(trt, config), layers=network.num_layers, half_layers=half,
        seconds=time.monotonic() - started)
    log(f"[{spec.name}] wrote {plan_path} ({plan_path.stat().st_size / 2**20:.1f} MiB) "
        f"in {report.seconds:.0f} s")
    return report


def build_engines(onnx_dir: str | Path, output_dir: str | Path, networks: Sequence[str], options: BuildOptions,
                  onnx_suffix: str = "", log: Callable[[str], None] = print) -> dict[str, dict]:
    """Build `networks` from ONNX_DIR/<name><onnx_suffix>.onnx into OUTPUT_DIR, with BUILD_INFO_FILE beside them."""
    reports = {}
    for name in networks:
        spec = NETWORKS[name]
        onnx_path = Path(onnx_dir) / f"{name}{onnx_suffix}.onnx"
        reports[name] = build_engine(onnx_path, Path(output_dir) / spec.plan_file, spec, options, log=log).to_json()
    (Path(output_dir) / BUILD_INFO_FILE).write_text(json.dumps(reports, indent=2) + "\n")
    return reports
