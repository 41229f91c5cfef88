"""The onnxruntime engine: an exported .onnx network in an InferenceSession, torch tensors in and out.

On the CPU tensors cross as numpy arrays (no copy for contiguous CPU tensors). On a CUDA device
with the CUDA execution provider (package onnxruntime-gpu), inputs and the preallocated torch
output are bound in place with io_binding, so nothing goes through host memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from f5_triton.engines.base import Engine, EngineConfig, EngineUnavailable, NetworkSpec, require_file

logger = logging.getLogger(__name__)

ORT_TYPES = {
    "tensor(float)": torch.float32,
    "tensor(float16)": torch.float16,
    "tensor(double)": torch.float64,
    "tensor(bool)": torch.bool,
    "tensor(int64)": torch.int64,
    "tensor(int32)": torch.int32,
}
NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
               torch.bool: np.bool_, torch.int64: np.int64, torch.int32: np.int32}
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise EngineUnavailable("onnxruntime is not installed: pip install onnxruntime (CPU) or "
                                "onnxruntime-gpu (CUDA), or pip install 'f5-triton[onnx]'") from exc
    return onnxruntime


def default_providers(device: torch.device) -> tuple[str, ...]:
    return (CUDA_PROVIDER, CPU_PROVIDER) if device.type == "cuda" else (CPU_PROVIDER,)


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else provider


class OnnxRuntimeEngine(Engine):
    """One network's .onnx file in onnxruntime; raises EngineUnavailable when it cannot run here."""

    kind = "onnxruntime"

    def __init__(self, spec: NetworkSpec, config: EngineConfig):
        ort = _import_onnxruntime()
        path = require_file(config, spec, ".onnx")
        self.spec = spec
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
        providers = list(config.providers or default_providers(self.device))
        available = ort.get_available_providers()
        missing = [_provider_name(p) for p in providers if _provider_name(p) not in available]
        if missing:
            raise EngineUnavailable(f"onnxruntime {ort.__version__} has no {', '.join(missing)} (it has "
                                    f"{', '.join(available)}); for CUDA: pip uninstall onnxruntime && "
                                    f"pip install onnxruntime-gpu")
        if self.device.type == "cuda":
            providers = [(CUDA_PROVIDER, {"device_id": self.device.index}) if _provider_name(p) == CUDA_PROVIDER
                         else p for p in providers]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # corrupt file, unsupported opset or op, CUDA libraries that fail to load
            raise EngineUnavailable(f"onnxruntime cannot load {path}: {type(exc).__name__}: {exc}") from exc
        self._check_signature(path)
        # onnxruntime silently drops a provider whose libraries fail to load: running on the CPU instead
        # of the GPU must not go unnoticed.
        self.bound = CUDA_PROVIDER in self.session.get_providers() and self.device.type == "cuda"
        if self.device.type == "cuda" and not self.bound:
            raise EngineUnavailable(f"onnxruntime could not start the CUDA provider for {path} (session runs on "
                                    f"{self.session.get_providers()}); check the CUDA/cuDNN versions onnxruntime-gpu needs")
        self._input_types = [ORT_TYPES[i.type] for i in self.session.get_inputs()]
        output = self.session.get_outputs()[0]
        self._output_type = ORT_TYPES[output.type]
        self._output_static = {axis: size for axis, size in zip(spec.outputs[0].axes, output.shape)
                               if isinstance(size, int)}
        logger.info("%s: onnxruntime session on %s from %s", spec.name, self.session.get_providers()[0], path)

    def _check_signature(self, path: Path) -> None:
        got_in = tuple(i.name for i in self.session.get_inputs())
        got_out = tuple(o.name for o in self.session.get_outputs())
        if got_in != self.spec.input_names or got_out[:1] != self.spec.output_names:
            raise EngineUnavailable(f"{path} is not a {self.spec.name} network: inputs {got_in} / outputs {got_out}, "
                                    f"expected {self.spec.input_names} / {self.spec.output_names}; re-export it "
                                    f"with scripts/export_onnx.py")
        for node in (*self.session.get_inputs(), self.session.get_outputs()[0]):
            if node.type not in ORT_TYPES:
                raise EngineUnavailable(f"{path}: {node.name} has unsupported type {node.type}")

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.spec.check(inputs)
        if self.bound:
            return self._run_bound(inputs)
        feed = {name: t.detach().to("cpu", dtype).contiguous().numpy()
                for name, t, dtype in zip(self.spec.input_names, inputs, self._input_types)}
        output = self.session.run(self.spec.output_names, feed)[0]
        return torch.from_numpy(output)

    def _output_shape(self, inputs) -> list[int]:
        sizes = {**self._output_static, **self.spec.sizes(inputs)}
        try:
            return [sizes[axis] for axis in self.spec.outputs[0].axes]
        except KeyError as exc:
            raise EngineUnavailable(f"{self.spec.name}: output axis {exc} has no static size in the ONNX graph; "
                                    f"re-export it with scripts/export_onnx.py") from exc

    def _run_bound(self, inputs) -> torch.Tensor:
        index = self.device.index
        binding = self.session.io_binding()
        tensors = [t.detach().to(self.device, dtype).contiguous() for t, dtype in zip(inputs, self._input_types)]
        for name, tensor in zip(self.spec.input_names, tensors):
            binding.bind_input(name, "cuda", index, NUMPY_TYPES[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        output = torch.empty(self._output_shape(tensors), dtype=self._output_type, device=self.device)
        binding.bind_output(self.spec.output_names[0], "cuda", index, NUMPY_TYPES[output.dtype],
                            list(output.shape), output.data_ptr())
        # onnxruntime runs on its own CUDA stream: the inputs torch wrote must be complete first.
        # Run() synchronizes its stream before it returns, so the output is ready afterwards.
        torch.cuda.current_stream(self.device).synchronize()
        self.session.run_with_iobinding(binding)
        return output
