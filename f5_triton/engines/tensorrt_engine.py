"""The TensorRT engine: a serialized .plan (scripts/build_engines.py) run on torch's current CUDA stream.

Uses the TensorRT 10 tensor API: shapes are set per call with `set_input_shape`, torch tensors are
bound with `set_tensor_address`, outputs are allocated as torch tensors once TensorRT has inferred
their shapes, and `execute_async_v3` runs on the current torch stream, so no extra synchronization
is needed. Shapes outside the engine's optimization profile are refused with `ShapeOutOfRange`
before TensorRT sees them.
"""

from __future__ import annotations

import logging
import threading
from typing import Mapping, Sequence

import torch

from f5_triton.engines.base import EngineConfig, EngineUnavailable, NetworkSpec, ShapeOutOfRange, require_file

logger = logging.getLogger(__name__)

TENSORRT_HINT = (
    "install the TensorRT Python package, version 10.x, matching your CUDA: `pip install tensorrt` "
    "(x86-64; needs an NVIDIA GPU and driver), on Jetson the JetPack package `apt install python3-libnvinfer`; "
    "or run inside an NGC image that ships it (nvcr.io/nvidia/tritonserver:<yy.mm>-py3 or "
    "nvcr.io/nvidia/tensorrt:<yy.mm>-py3)"
)

# (min, opt, max) shape of each input in the engine's optimization profile
ProfileShapes = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]


def import_tensorrt():
    """The `tensorrt` module, or EngineUnavailable saying what to install."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or a placeholder package that raises on import
        raise EngineUnavailable(f"TensorRT is not available ({type(exc).__name__}: {exc}); {TENSORRT_HINT}") from exc
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        raise EngineUnavailable(f"the installed `tensorrt` package ({getattr(trt, '__file__', '?')}) is a "
                                f"placeholder without the TensorRT API; {TENSORRT_HINT}")
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise EngineUnavailable(f"TensorRT {trt.__version__} is too old: the tensor API used here needs 10.x; "
                                f"{TENSORRT_HINT}")
    return trt


def tensorrt_available() -> bool:
    """Whether a usable TensorRT (10.x with its Python API) is installed."""
    try:
        import_tensorrt()
    except EngineUnavailable:
        return False
    return True


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


class TensorRTEngine:
    """One network's TensorRT plan; raises EngineUnavailable when it cannot be loaded here."""

    kind = "tensorrt"

    def __init__(self, spec: NetworkSpec, config: EngineConfig):
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise EngineUnavailable("TensorRT needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False)")
        path = require_file(config, spec, ".plan")
        self.spec = spec
        self.device = torch.device(config.device if config.device != "cpu" else "cuda")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise EngineUnavailable(
                    f"TensorRT {trt.__version__} cannot deserialize {path}: it is corrupt, or was built by another "
                    f"TensorRT version or for another GPU (plans are not portable); rebuild it on this machine "
                    f"with scripts/build_engines.py")
            self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineUnavailable(f"TensorRT could not create an execution context for {path} (out of GPU memory?)")

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
        logger.info("%s: TensorRT %s engine from %s, profile %s", spec.name, trt.__version__, path, self.profile)

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
