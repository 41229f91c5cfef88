"""The gateway's way to Triton: gRPC through `f5_triton.client` (which retries once when Triton is busy or
a model process is restarting), errors turned into `APIError`s."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import numpy as np

from f5_triton.client import (STREAMING_MODEL, StreamInterrupted, is_refused, model_restarting, random_weights,
                              stream_synthesize, synthesize)
from f5_triton.gateway.errors import SERVER, UNAVAILABLE, APIError
from f5_triton.gateway.voices import Voice

# Triton input names -> the request fields of the speech endpoint.
API_FIELDS = {"target_text": "input", "reference_wav": "voice", "reference_wav_len": "voice",
              "reference_text": "voice", "sample_rate": "voice", "speed": "speed", "seed": "seed"}
_FIELD_IN_MESSAGE = re.compile(r"\b(" + "|".join(API_FIELDS) + r"): ")
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")


def api_error(exc: Exception, queue_limit: int | None = None) -> APIError:
    """A tritonclient error (or a lost connection) as the HTTP error the client should see.

    `queue_limit`: the models' max_queue_size, named when Triton refused a request for a full queue."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, StreamInterrupted):
        return APIError(502, str(exc), type=SERVER, code="stream_interrupted")
    if isinstance(exc, TimeoutError):
        return APIError(504, f"Triton did not answer in time: {exc}", type=UNAVAILABLE, code="timeout")
    if not isinstance(exc, InferenceServerException):
        return APIError(502, f"Triton request failed: {type(exc).__name__}: {exc}", type=SERVER)
    status = str(exc.status() or "")
    message = _ENSEMBLE_PREFIX.sub("", exc.message() or str(exc))
    # Errors inside a gRPC stream come without a status code; bad input still starts with its field.
    stream_invalid = not status and _FIELD_IN_MESSAGE.match(message)
    if "INVALID_ARGUMENT" in status or status == "400" or stream_invalid:
        match = _FIELD_IN_MESSAGE.search(message)
        param = API_FIELDS[match.group(1)] if match else None
        if match:  # "speed: is 5.0; ..." keeps its wording, named as the API names it
            message = message[:match.start()] + f"{param}: " + message[match.end():]
        return APIError(400, message, param=param, code="invalid_value")
    if model_restarting(exc):  # INTERNAL from Triton 2.51's python backend; the supervisor replaces the instance
        return APIError(503, f"the model is restarting, retry shortly: {message}", type=UNAVAILABLE,
                        code="restarting")
    if "Exceeds maximum queue size" in message:
        limit = f" of {queue_limit} requests" if queue_limit else ""
        return APIError(503, f"the server is at capacity: its queue limit{limit} (max_queue_size) is reached; "
                        "retry later", type=UNAVAILABLE, code="queue_full")
    if is_refused(exc):  # the streaming model's admission: a gRPC stream's error carries only "server busy: ..."
        return APIError(503, f"the server is at capacity: {message.removeprefix('server busy: ')}", type=UNAVAILABLE,
                        code="server_busy")
    if "UNAVAILABLE" in status or "RESOURCE_EXHAUSTED" in status:
        return APIError(503, f"Triton is unavailable or busy: {message}", type=UNAVAILABLE, code="unavailable")
    if "DEADLINE_EXCEEDED" in status:
        return APIError(504, f"Triton did not answer in time: {message}", type=UNAVAILABLE, code="timeout")
    return APIError(502, f"Triton failed: {message}", type=SERVER)


class TritonBackend:
    """Speech from a voice and a text, whole (`f5_tts`, batched) or streamed (`f5_tts_streaming`)."""

    def __init__(self, url: str, model: str = "f5_tts", streaming_model: str = STREAMING_MODEL,
                 timeout: float | None = 300.0):
        self.url = url
        self.model = model
        self.streaming_model = streaming_model
        self.timeout = timeout
        self._client = None
        self._queue_limit: int | None = None
        self._lock = threading.Lock()

    def _shared_client(self):
        """One gRPC channel for all non-streaming calls (tritonclient's gRPC client is thread-safe)."""
        with self._lock:
            if self._client is None:
                import tritonclient.grpc

                self._client = tritonclient.grpc.InferenceServerClient(self.url)
            return self._client

    def synthesize(self, voice: Voice, text: str, **optional) -> np.ndarray:
        try:
            return synthesize(self.url, voice.wave, voice.transcript, text, protocol="grpc", model=self.model,
                              timeout=self.timeout, client=self._shared_client(), sample_rate=voice.sample_rate,
                              **optional)
        except Exception as exc:
            raise api_error(exc, self.queue_limit()) from exc

    def queue_limit(self) -> int | None:
        """max_queue_size of the ensemble's first step (every step is rendered with the same), or None."""
        if self._queue_limit is None:
            try:
                client = self._shared_client()
                steps = client.get_model_config(self.model, as_json=True)["config"]["ensemble_scheduling"]["step"]
                step = client.get_model_config(steps[0]["model_name"], as_json=True)["config"]
                self._queue_limit = int(step["dynamic_batching"]["default_queue_policy"]["max_queue_size"])
            except Exception:  # not an ensemble of queued steps, or Triton unreachable: the message says less
                return None
        return self._queue_limit

    def stream(self, voice: Voice, text: str, **optional) -> Iterator[np.ndarray]:
        """Waveform pieces as Triton sends them; errors raise `APIError`. Close it to cancel."""
        pieces = stream_synthesize(self.url, voice.wave, voice.transcript, text, model=self.streaming_model,
                                   timeout=self.timeout, sample_rate=voice.sample_rate, **optional)
        try:
            while True:
                try:
                    piece = next(pieces)
                except StopIteration:
                    return
                except Exception as exc:
                    raise api_error(exc) from exc
                yield piece
        finally:
            pieces.close()

    def ready(self) -> bool:
        try:
            client = self._shared_client()
            return bool(client.is_model_ready(self.model) and client.is_model_ready(self.streaming_model))
        except Exception:
            return False

    def random_weights(self) -> bool:
        """Whether the server runs a random checkpoint (noise, not speech), as its config says."""
        return random_weights(self._shared_client(), self.model)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
