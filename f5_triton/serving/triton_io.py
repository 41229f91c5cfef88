"""Glue shared by the python-backend adapters in model_repo/: parameters, inputs, errors, and
whether a request is still wanted (cancellation, deadline).

Imported only inside tritonserver's python backend (it needs `triton_python_backend_utils`).
"""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from f5_triton.config import SERVING_DOCUMENT, load_serving_document
from f5_triton.errors import InvalidInputError, ServerBusyError
from f5_triton.serving import metrics as metric_names

log = logging.getLogger("f5_triton.serving")


class TritonLogHandler(logging.Handler):
    """The package's log records -> Triton's own log (`pb_utils.Logger`), beside the server's lines.

    A stub process has no logging configuration: without this, INFO records (CUDA-graph captures, engine
    choices) vanish and warnings reach only the stub's stderr, not `--log-file`.
    """

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = f"{record.name}: {self.format(record)}"
            if record.levelno >= logging.ERROR:
                pb_utils.Logger.log_error(message)
            elif record.levelno >= logging.WARNING:
                pb_utils.Logger.log_warn(message)
            else:
                pb_utils.Logger.log_info(message)
        except Exception:  # logging must never fail a request
            self.handleError(record)


def _route_package_logging() -> None:
    package = logging.getLogger("f5_triton")
    if not any(isinstance(handler, TritonLogHandler) for handler in package.handlers):
        package.addHandler(TritonLogHandler())
        package.setLevel(logging.INFO)


_route_package_logging()  # every adapter imports this module first


def parameters(args: dict) -> dict[str, str]:
    """The model config's `parameters` as a plain {key: string} dict."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def is_passive(args: dict) -> bool:
    """Whether this instance is in a passive instance group: loaded but never given requests (the standby of
    `repository._flow_instances`), so it should load nothing."""
    name = args["model_instance_name"]
    groups = json.loads(args["model_config"]).get("instance_group", [])
    return any(group.get("passive") and name.startswith(group["name"] + "_") for group in groups)


def set_torch_threads(threads: int | None) -> None:
    """Use `threads` torch CPU threads (placement.torch_threads; 0 or None: torch's default, one thread per core).

    Every python-backend instance is its own process; with the default each one starts a thread per
    core, and a dozen of them oversubscribe the host and starve the GPU instances' launch threads.
    """
    if threads:
        import torch

        torch.set_num_threads(threads)


def device(args: dict) -> str:
    """'cuda:N' for a KIND_GPU instance (made the stub's current device too), else 'cpu'."""
    if args.get("model_instance_kind") == "GPU":
        import torch

        index = int(args["model_instance_device_id"])
        torch.cuda.set_device(index)  # else streams, graphs and libraries default to cuda:0 (seen: graph capture errors)
        return f"cuda:{index}"
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


def error_response(exc: Exception, metrics=None):
    """Bad input -> INVALID_ARG (HTTP 400); an admission limit -> UNAVAILABLE (retriable); anything else ->
    INTERNAL, logged with its traceback.

    `metrics` (a `metrics.Metrics`) counts the failure under its reason.
    """
    if metrics is not None:
        metrics.rejected(metric_names.reason_of(exc))
    if isinstance(exc, InvalidInputError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))
    if isinstance(exc, ServerBusyError):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"server busy: {exc}",
                                                                     pb_utils.TritonError.UNAVAILABLE))
    log.exception("request failed")
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}",
                                                                 pb_utils.TritonError.INTERNAL))


# Ensemble tensor from preprocess to the later steps: time.time() when preprocess took the request.
RECEIVED_AT = "received_at"


def received_at(value: np.ndarray | None) -> float | None:
    """The `received_at` input of one request (batch dimension removed), None when not sent."""
    return None if value is None else float(value.reshape(-1)[0])


class RequestWatch:
    """Whether each request of a batch is still wanted, asked between ODE steps.

    A request is dropped when its client cancelled it (`request.is_cancelled()`) or when its
    deadline passed. The deadline is Triton's own per-request `timeout` parameter (microseconds;
    tritonclient `infer(..., timeout=...)`), which Triton applies to queueing (queue policy,
    `allow_timeout_override`) and the ensemble passes on to every step; here it also bounds the
    work, counted from `received_at` (when preprocess took the request) or else from now.

    Cancellation reaches a running step only when the model was called directly: tritonserver
    2.51's ensemble passes a client's cancellation on when it schedules its next step, so a
    cancelled `f5_tts` request finishes flow matching and is then dropped before postprocess.
    """

    def __init__(self, requests, starts: list[float | None] | None = None):
        now = time.time()
        self.requests = requests
        self.deadlines = []
        for request, start in zip(requests, starts or [None] * len(requests)):
            timeout_us = request.timeout()
            self.deadlines.append((now if start is None else start) + timeout_us / 1e6 if timeout_us > 0 else math.inf)
        self.dropped: dict[int, str] = {}  # request index -> metrics reason

    def alive(self, index: int) -> bool:
        if index not in self.dropped:
            if time.time() > self.deadlines[index]:
                self.dropped[index] = metric_names.DEADLINE_EXCEEDED
            elif self.requests[index].is_cancelled():
                self.dropped[index] = metric_names.CANCELLED
        return index not in self.dropped

    def error_response(self, index: int, metrics=None):
        """The answer to a dropped request: CANCELLED, or UNAVAILABLE as Triton's own queue timeout."""
        reason = self.dropped[index]
        if metrics is not None:
            metrics.rejected(reason)
        if reason == metric_names.CANCELLED:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("request cancelled",
                                                                         pb_utils.TritonError.CANCELLED))
        timeout = self.requests[index].timeout() / 1e6
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(
            f"deadline exceeded: the request's timeout of {timeout:g} s passed before its audio was generated",
            pb_utils.TritonError.UNAVAILABLE))


class Adapter:
    """Base of the model_repo/*/1/model.py adapters (`TritonPythonModel`), so that each states only what is particular
    to it. `initialize` reads the model's serving document once into its typed settings (`self.settings`, a
    `config.ServingSettings`), sets torch's threads, makes its metrics (`self.metrics`) and calls `load(args)`, which
    builds what the model runs, once; `answer_each` is the usual
    `execute`: one response per request, an exception becoming that request's error response (and counted).

    The `sys.path` preamble stays in each model.py: it runs before this package can be imported."""

    standby_loads = True  # False: a passive instance (flow_matching's standby) loads nothing

    def initialize(self, args: dict) -> None:
        if not self.standby_loads and is_passive(args):
            return
        self.name = args["model_name"]
        self.settings = load_serving_document(parameters(args).get(SERVING_DOCUMENT))
        set_torch_threads(self.settings.placement.torch_threads)
        self.metrics = metric_names.Metrics(self.name)
        self.load(args)

    def load(self, args: dict) -> None:
        """Build what the model runs from `self.settings` (and `device(args)`)."""

    def error(self, exc: Exception):
        """The response to a request that raised `exc` (counted in the model's metrics)."""
        return error_response(exc, self.metrics)

    def answer_each(self, requests, answer) -> list:
        """`answer(request)` for each request, or the error response of the exception it raised."""
        responses = []
        for request in requests:
            try:
                responses.append(answer(request))
            except Exception as exc:
                responses.append(self.error(exc))
        return responses
