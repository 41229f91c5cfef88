"""The TensorRT engine: a serialized .plan (scripts/build_engines.py) run on torch's current CUDA stream.

Two TensorRT flavours share one Python API (network, ONNX parser, builder, runtime) and both work here:
`tensorrt` (TensorRT 10.x / 11.x: every NVIDIA GPU it supports, Hopper included) and `tensorrt_rtx`
(TensorRT for RTX: compute capability 8.0, 8.6, 8.9 and 12.x; its builder needs no GPU). A plan runs
only in the flavour (and version) that built it. Builds use `tensorrt` when it imports with its real
API, else `tensorrt_rtx` (`import_tensorrt`); the engine loads a plan with whichever installed flavour
accepts it. F5_TENSORRT=tensorrt|tensorrt-rtx (or build_engines.py --tensorrt) forces one.

Uses the tensor API: shapes are set per call with `set_input_shape`, torch tensors are bound with
`set_tensor_address`, outputs are allocated as torch tensors once TensorRT has inferred their shapes,
and `execute_async_v3` runs on the current torch stream, so no extra synchronization is needed.
Shapes outside the engine's optimization profile are refused with `ShapeOutOfRange` before TensorRT
sees them.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from typing import Mapping, Sequence

import torch

from f5_triton.engines.base import Engine, EngineConfig, EngineUnavailable, NetworkSpec, ShapeOutOfRange, require_file

logger = logging.getLogger(__name__)

# flavour (its pip name, what users type) -> the module it installs
FLAVOURS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
FLAVOUR_ENV = "F5_TENSORRT"  # auto | tensorrt | tensorrt-rtx
# TensorRT-RTX's runtime refuses other GPUs ("Supported compute capabilities: 8.0 8.6 8.9 12.0 12.1")
RTX_COMPUTE_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
TENSORRT_HINT = (
    "install TensorRT 10.x or 11.x matching your CUDA: `pip install tensorrt` (x86-64 / SBSA; any NVIDIA GPU, "
    "Hopper included), on Jetson the JetPack package `apt install python3-libnvinfer`, or run inside an NGC "
    "image that ships it (nvcr.io/nvidia/tritonserver:<yy.mm>-py3 or nvcr.io/nvidia/tensorrt:<yy.mm>-py3); "
    "or TensorRT for RTX: `pip install tensorrt-rtx` (or the package's extra: pip install 'f5-triton[tensorrt-rtx]'), "
    "which runs on GPUs of compute capability 8.0, 8.6, 8.9 and 12.x, not on Hopper (9.0)"
)

# (min, opt, max) shape of each input in the engine's optimization profile
ProfileShapes = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]


def flavour_of(trt) -> str:
    """"tensorrt" or "tensorrt-rtx": which flavour an imported module is."""
    return "tensorrt-rtx" if trt.__name__.split(".")[0] == "tensorrt_rtx" else "tensorrt"


def describe(trt) -> str:
    """"TensorRT 10.8.0.43" or "TensorRT-RTX 1.7.1.116"."""
    return f"{'TensorRT-RTX' if flavour_of(trt) == 'tensorrt-rtx' else 'TensorRT'} {trt.__version__}"


def _import_flavour(flavour: str):
    """(module, None) when `flavour` imports with a usable API, else (None, what was found)."""
    module_name = FLAVOURS[flavour]
    try:
        trt = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:  # the package is there, something it needs is not
            return None, f"`{module_name}` is installed but fails to import ({exc})"
        return None, f"`{module_name}` is not installed"
    except Exception as exc:  # a placeholder package that raises on import, a missing CUDA library
        return None, f"`{module_name}` fails to import ({type(exc).__name__}: {exc})"
    if not all(hasattr(trt, name) for name in ("Builder", "Runtime", "NetworkDefinitionCreationFlag")):
        return None, (f"`{module_name}` ({getattr(trt, '__file__', '?')}) is a placeholder package without the "
                      f"TensorRT API")
    version = str(getattr(trt, "__version__", "0"))
    if flavour == "tensorrt" and int(version.split(".")[0] or 0) < 10:
        return None, f"`tensorrt` {version} is too old: the tensor API and strongly typed builds used here need 10.x"
    return trt, None


def requested_flavour(flavour: str | None = None) -> str:
    """The flavour asked for: the argument, else $F5_TENSORRT, else "auto"."""
    flavour = (flavour or os.environ.get(FLAVOUR_ENV) or "auto").strip().lower().replace("_", "-")
    if flavour != "auto" and flavour not in FLAVOURS:
        raise EngineUnavailable(f"unknown TensorRT flavour {flavour!r} (from --tensorrt or ${FLAVOUR_ENV}): "
                                f"use auto, tensorrt or tensorrt-rtx")
    return flavour


def usable_tensorrts(flavour: str | None = None) -> list:
    """Every usable TensorRT module of the requested flavour(s), `tensorrt` first; EngineUnavailable if none.

    flavour: "tensorrt", "tensorrt-rtx", or None / "auto" ($F5_TENSORRT, else both).
    """
    flavour = requested_flavour(flavour)
    found, modules = [], []
    for candidate in (FLAVOURS if flavour == "auto" else (flavour,)):
        trt, problem = _import_flavour(candidate)
        if trt is not None:
            modules.append(trt)
        else:
            found.append(problem)
    if modules:
        return modules
    wanted = "TensorRT" if flavour == "auto" else f"the {flavour} flavour (forced by --tensorrt or ${FLAVOUR_ENV})"
    if flavour != "auto":  # say what else is there
        for other in FLAVOURS:
            trt = _import_flavour(other)[0] if other != flavour else None
            if trt is not None:
                found.append(f"{describe(trt)} is installed (--tensorrt {other} or {FLAVOUR_ENV}={other} uses it)")
    raise EngineUnavailable(f"{wanted} is not available: {'; '.join(found)}. To fix: {TENSORRT_HINT}")


def import_tensorrt(flavour: str | None = None):
    """The TensorRT module that builds use (`tensorrt` when it imports with its real API, else `tensorrt_rtx`,
    unless `flavour` or $F5_TENSORRT names one), or EngineUnavailable saying what was found."""
    return usable_tensorrts(flavour)[0]


def tensorrt_available(flavour: str | None = None) -> bool:
    """Whether a usable TensorRT (either flavour, unless one is named) is installed."""
    try:
        import_tensorrt(flavour)
    except EngineUnavailable:
        return False
    return True


def unsupported_gpu(trt, capability: tuple[int, int]) -> str | None:
    """Why `trt`'s runtime cannot run plans on a GPU of this compute capability, or None when it can."""
    if flavour_of(trt) == "tensorrt-rtx" and tuple(capability) not in RTX_COMPUTE_CAPABILITIES:
        supported = ", ".join(f"{major}.{minor}" for major, minor in RTX_COMPUTE_CAPABILITIES)
        return (f"{describe(trt)} runs on GPUs of compute capability {supported}; this GPU is "
                f"{capability[0]}.{capability[1]}{' (Hopper)' if capability[0] == 9 else ''}: install TensorRT "
                f"(`pip install tensorrt`, or an NGC image) and rebuild the plans with it")
    return None


def runs_here(device: int = 0) -> bool:
    """Whether TensorRT plans can run on this machine's GPU `device` (a usable flavour that supports it)."""
    if not torch.cuda.is_available():
        return False
    try:
        trt = import_tensorrt()
    except EngineUnavailable:
        return False
    return unsupported_gpu(trt, torch.cuda.get_device_capability(device)) is None


def check_profile(shapes: Mapping[str, Sequence[int]], profile: ProfileShapes, network: str = "engine") -> None:
    """Raise ShapeOutOfRange naming the first input whose shape lies outside the profile's [min, max]."""
    for name, shape in shapes.items():
        low, _, high = profile[name]
        if len(shape) != len(low) or any(not lo <= s <= hi for s, lo, hi in zip(shape, low, high)):
            raise ShapeOutOfRange(
                f"{network}: input {name!r} has shape {tuple(shape)}, outside the engine's optimization profile "
                f"[{tuple(low)} .. {tuple(high)}]; shorten or split the batch, or rebuild the engine with "
                f"larger limits (scripts/build_engines.py --max-requests/--max-frames)")


def _torch_dtypes(trt) -> dict:
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32,
             "int64": torch.int64, "int8": torch.int8, "bool": torch.bool, "uint8": torch.uint8}
    return {getattr(trt, name): dtype for name, dtype in names.items() if hasattr(trt, name)}


class TensorRTEngine(Engine):
    """One network's TensorRT plan; raises EngineUnavailable when it cannot be loaded here."""

    kind = "tensorrt"

    def __init__(self, spec: NetworkSpec, config: EngineConfig):
        candidates = usable_tensorrts()
        if not torch.cuda.is_available():
            raise EngineUnavailable("TensorRT needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)")
        path = require_file(config, spec, ".plan")
        self.spec = spec
        self.device = torch.device(config.device if config.device != "cpu" else "cuda")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        gpu = torch.cuda.get_device_name(self.device)
        # A plan loads only in the flavour that built it: with both installed (and none forced), try each.
        problems = []
        for trt in candidates:
            problem = unsupported_gpu(trt, torch.cuda.get_device_capability(self.device))
            if problem:
                problems.append(f"{gpu}: {problem}")
                continue
            self._logger = trt.Logger(trt.Logger.WARNING)
            with torch.cuda.device(self.device):
                self._runtime = trt.Runtime(self._logger)
                self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is not None:
                break
            problems.append(f"{describe(trt)} cannot deserialize {path}: it is corrupt, or was built by another "
                            f"TensorRT flavour or version, or for another GPU (TensorRT plans are not portable; "
                            f"${FLAVOUR_ENV} picks the flavour); rebuild it on this machine with "
                            f"scripts/build_engines.py")
        else:
            raise EngineUnavailable("; ".join(problems))
        with torch.cuda.device(self.device):
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineUnavailable(f"{describe(trt)} could not create an execution context for {path} "
                                    f"(out of GPU memory?)")

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        outputs = tuple(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        if inputs != spec.input_names or outputs[:1] != spec.output_names:
            raise EngineUnavailable(f"{path} is not a {spec.name} engine: inputs {inputs} / outputs {outputs}, "
                                    f"expected {spec.input_names} / {spec.output_names}")
        dtypes = _torch_dtypes(trt)
        self._dtypes = {name: dtypes[self.engine.get_tensor_dtype(name)] for name in names}
        self.profile: ProfileShapes = {
            name: tuple(tuple(dims) for dims in self.engine.get_tensor_profile_shape(name, 0)) for name in inputs}
        self._lock = threading.Lock()  # one execution context: calls must not interleave
        logger.info("%s: %s engine from %s, profile %s", spec.name, describe(trt), path, self.profile)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.spec.check(inputs)
        check_profile({name: tuple(t.shape) for name, t in zip(self.spec.input_names, inputs)}, self.profile,
                      self.spec.name)
        output_name = self.spec.output_names[0]
        with self._lock, torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            tensors = [t.detach().to(self.device, self._dtypes[name]).contiguous()
                       for name, t in zip(self.spec.input_names, inputs)]
            for name, tensor in zip(self.spec.input_names, tensors):
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    raise ShapeOutOfRange(f"{self.spec.name}: TensorRT refused shape {tuple(tensor.shape)} for {name!r}")
                self.context.set_tensor_address(name, tensor.data_ptr())
            shape = tuple(self.context.get_tensor_shape(output_name))
            if any(size < 0 for size in shape):
                raise RuntimeError(f"{self.spec.name}: TensorRT could not infer the output shape ({shape})")
            output = torch.empty(shape, dtype=self._dtypes[output_name], device=self.device)
            self.context.set_tensor_address(output_name, output.data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{self.spec.name}: TensorRT execution failed (see the TensorRT log above)")
            # `tensors` may be freed now: the caching allocator reuses memory in stream order
        return output.float() if output.dtype != torch.float32 and output.is_floating_point() else output
