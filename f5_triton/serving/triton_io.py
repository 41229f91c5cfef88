"""Glue shared by the python-backend adapters in model_repo/: parameters, inputs, errors.

Imported only inside tritonserver's python backend (it needs `triton_python_backend_utils`).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from f5_triton.errors import InvalidInputError

log = logging.getLogger("f5_triton.serving")


def parameters(args: dict) -> dict[str, str]:
    """The model config's `parameters` as a plain {key: string} dict."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def device(args: dict) -> str:
    """'cuda:N' for a KIND_GPU instance, else 'cpu'."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return "cpu"


def inputs(request, names) -> dict[str, np.ndarray | None]:
    """Named inputs of one request with Triton's batch dimension removed (None if not sent)."""
    arrays = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        arrays[name] = None if tensor is None else tensor.as_numpy()[0]
    return arrays


def response(arrays: dict[str, np.ndarray]):
    """One response with Triton's batch dimension added back."""
    return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, np.expand_dims(v, 0)) for k, v in arrays.items()])


def error_response(exc: Exception):
    """Bad input -> INVALID_ARG (HTTP 400); anything else -> INTERNAL, logged with its traceback."""
    if isinstance(exc, InvalidInputError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
    log.exception("request failed")
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}",
                                                                 pb_utils.TritonError.INTERNAL))
