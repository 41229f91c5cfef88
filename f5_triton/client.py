"""Client side: build KServe v2 requests for the `f5_tts` model and send them with tritonclient.

`client_http.py`, `client_grpc.py`, `benchmark.py`, the gateway and the tests all go through here,
so the wire format (names and dtypes from f5_triton.request) is written once.
`stream_synthesize` talks to the decoupled `f5_tts_streaming` model over a gRPC stream.

Both retry a request once when the server says it may succeed later (`is_retriable`: UNAVAILABLE, e.g.
a full queue, or a model process that died and is being restarted), after a short backoff and only
within the caller's `timeout`. A stream that already delivered audio is never retried: it ends with
`StreamInterrupted`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import queue
import random
import re
import sys
import time
from collections.abc import Iterator
from types import ModuleType

import numpy as np

from f5_triton.config import DEFAULT_SAMPLING, DEFAULT_SERVER, SAMPLE_RATE, parse_bool
from f5_triton.flags import environment_setting
from f5_triton.request import INPUTS, MODEL, STREAM_OUTPUTS, STREAMING_MODEL

NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_STRING": object}
WIRE_TYPES = {"TYPE_FP32": "FP32", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_STRING": "BYTES"}
FIELDS = {f.name: f for f in INPUTS}

# tritonserver 2.51's python backend answers INTERNAL for the requests of an instance whose stub process
# died (it is replaced by the supervisor's watchdog): a restart, not a bug in the request.
_DEAD_PROCESS = ("Stub process", "is not healthy")
RETRY_BACKOFF_S = 0.5  # first retry after 0.5-1 s (jittered, so that refused clients do not return together)
# After a model process died: Triton routes batches to the dead instance until the watchdog's first reload leaves it
# out (seconds), so a quicker retry can meet the same dead process.
RESTART_BACKOFF_S = 2.0


class StreamInterrupted(RuntimeError):
    """A stream failed after some of its audio was delivered; not retried (the listener has heard it)."""

    def __init__(self, model: str, pieces: int, cause: Exception):
        self.pieces, self.cause = pieces, cause
        reason = getattr(cause, "message", lambda: str(cause))() or str(cause)
        super().__init__(f"{model} failed after {pieces} piece(s) of audio were sent; the stream is incomplete "
                         f"and was not retried: {reason}")


def model_restarting(exc: BaseException) -> bool:
    """Whether `exc` is Triton's answer for a request whose model process died (the model is reloaded)."""
    message = getattr(exc, "message", lambda: "")() or ""
    return all(part in message for part in _DEAD_PROCESS)


def is_retriable(exc: BaseException) -> bool:
    """Whether sending the same request again may succeed: the server was busy or a model process restarted.

    A request that ran out of its own deadline is not retriable.
    """
    return _unavailable(exc) or model_restarting(exc)


def _unavailable(exc: BaseException) -> bool:
    """A tritonclient error with status UNAVAILABLE (gRPC) or 503 (HTTP), other than the request's own deadline."""
    from tritonclient.utils import InferenceServerException

    if not isinstance(exc, InferenceServerException):
        return False
    status, message = str(exc.status() or ""), exc.message() or ""
    return "deadline exceeded" not in message and ("UNAVAILABLE" in status or status == "503")


def is_refused(exc: BaseException) -> bool:
    """Whether the server turned the request away because it was busy (admission limit, full queue, queue
    deadline), as opposed to failing it: UNAVAILABLE / 503, not a restarting model process. A gRPC stream's error
    carries only the message, where the streaming model's refusals say "server busy"."""
    from tritonclient.utils import InferenceServerException

    if not isinstance(exc, InferenceServerException) or model_restarting(exc):
        return False
    return _unavailable(exc) or (exc.status() is None and "server busy" in (exc.message() or ""))


def _retry_delay(deadline: float | None, backoff: float, exc: BaseException) -> float | None:
    """Seconds to wait before retrying after `exc`, or None when the caller's deadline leaves no room for it."""
    delay = (max(backoff, RESTART_BACKOFF_S) if model_restarting(exc) else backoff) * (1.0 + random.random())
    if deadline is not None and time.monotonic() + delay >= deadline:
        return None
    return delay


def protocol_module(protocol: str) -> ModuleType:
    if protocol == "http":
        import tritonclient.http as module
    elif protocol == "grpc":
        import tritonclient.grpc as module
    else:
        raise ValueError(f"protocol must be http or grpc, got {protocol!r}")
    return module


def build_inputs(module: ModuleType, wave: np.ndarray, reference_text: str, target_text: str,
                 **optional) -> list:
    """InferInputs for one request; `optional` holds any of sample_rate, nfe_steps, cfg_strength, speed, seed."""
    wave = np.asarray(wave, dtype=np.float32).reshape(-1)
    values = {"reference_wav": wave, "reference_wav_len": len(wave), "reference_text": reference_text.encode("utf-8"),
              "target_text": target_text.encode("utf-8"),
              **{k: v for k, v in optional.items() if v is not None}}
    inputs = []
    for name, value in values.items():
        if name not in FIELDS:
            raise ValueError(f"unknown input {name!r}; known: {', '.join(FIELDS)}")
        field = FIELDS[name]
        array = np.asarray(value, dtype=NUMPY_TYPES[field.triton_type]).reshape(1, -1)  # batch of one
        tensor = module.InferInput(name, list(array.shape), WIRE_TYPES[field.triton_type])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def synthesize(url: str, wave: np.ndarray, reference_text: str, target_text: str, protocol: str = "grpc",
               model: str = MODEL, timeout: float | None = None, client=None, retries: int = 1,
               backoff: float = RETRY_BACKOFF_S, **optional) -> np.ndarray:
    """Send one request and return the 24 kHz waveform. Pass `client` to reuse a connection.

    `timeout` bounds the whole call, retries included; a retriable error (`is_retriable`) is retried up
    to `retries` times after `backoff`-`2 * backoff` s when the deadline leaves room.
    """
    module = protocol_module(protocol)
    inputs = build_inputs(module, wave, reference_text, target_text, **optional)
    outputs = [module.InferRequestedOutput("waveform")]
    deadline = None if timeout is None else time.monotonic() + timeout
    # gRPC bounds each call (client_timeout); tritonclient.http bounds a connection's reads (network_timeout), so an
    # HTTP call is bounded only on a connection made here, and a given HTTP client keeps its own timeouts
    per_call = protocol == "grpc" and deadline is not None
    bounds = {} if protocol == "grpc" or timeout is None else {"connection_timeout": timeout, "network_timeout": timeout}
    own = None if client is not None else module.InferenceServerClient(url, **bounds)
    attempt = 0
    try:
        while True:
            kwargs = {"client_timeout": max(deadline - time.monotonic(), 0.001)} if per_call else {}
            try:
                result = (client or own).infer(model, inputs, outputs=outputs, **kwargs)
                return result.as_numpy("waveform").reshape(-1)
            except Exception as exc:
                delay = _retry_delay(deadline, backoff, exc) if attempt < retries and is_retriable(exc) else None
                if delay is None:
                    raise
            attempt += 1
            time.sleep(delay)
    finally:
        if own is not None:
            own.close()


def stream_synthesize(url: str, wave: np.ndarray, reference_text: str, target_text: str,
                      model: str = STREAMING_MODEL, timeout: float | None = None, retries: int = 1,
                      backoff: float = RETRY_BACKOFF_S, **optional) -> Iterator[np.ndarray]:
    """Pieces of the 24 kHz waveform from the streaming model, as they arrive (gRPC).

    Joined, they are the request's audio. `timeout` bounds the wait for each piece. Closing the
    generator early cancels the request on the server. A retriable error before any audio arrived
    starts the stream again `retries` times (after `backoff`-`2 * backoff` s); after audio arrived it
    raises `StreamInterrupted`.
    """
    import tritonclient.grpc as grpcclient

    inputs = build_inputs(grpcclient, wave, reference_text, target_text, **optional)
    outputs = [grpcclient.InferRequestedOutput(f.name) for f in STREAM_OUTPUTS]
    for attempt in range(retries + 1):
        pieces = 0
        try:
            with contextlib.closing(_stream_once(url, grpcclient, model, inputs, outputs, timeout)) as stream:
                for piece in stream:
                    pieces += 1
                    yield piece
            return
        except Exception as exc:
            if pieces:
                raise StreamInterrupted(model, pieces, exc) from exc
            delay = _retry_delay(None, backoff, exc) if attempt < retries and is_retriable(exc) else None
            if delay is None:
                raise
        time.sleep(delay)


def _stream_once(url: str, grpcclient: ModuleType, model: str, inputs: list, outputs: list,
                 timeout: float | None) -> Iterator[np.ndarray]:
    results: queue.Queue = queue.Queue()
    finished = False
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            client.async_stream_infer(model, inputs, outputs=outputs)
        except Exception:
            # a stream that failed at once (server unreachable) reports why through the callback
            try:
                error = results.get(timeout=1.0)[1]
            except queue.Empty:
                error = None
            if error is None:
                raise
            finished = True
            raise error from None
        while not finished:
            try:
                result, error = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"no audio from {model} within {timeout} s") from None
            if error is not None:
                finished = True  # the server ended the request
                raise error
            finished = bool(result.as_numpy("is_final").reshape(-1)[0])
            yield result.as_numpy("waveform").reshape(-1)
    finally:
        client.stop_stream(cancel_requests=not finished)
        client.close()


RANDOM_WEIGHTS_WARNING = "WARNING: the server runs RANDOM WEIGHTS: its audio is noise, not speech"


def random_weights(client, model: str = MODEL) -> bool:
    """Whether the server's `model` was rendered from a random checkpoint (its config says so)."""
    config = client.get_model_config(model)
    if not isinstance(config, dict):  # gRPC: a ModelConfigResponse message
        parameters = {key: value.string_value for key, value in config.config.parameters.items()}
    else:
        parameters = {key: value.get("string_value") for key, value in config.get("parameters", {}).items()}
    return parse_bool(parameters.get("random_weights"), False)


def server_message(exc: Exception) -> str:
    """The server's one-line explanation of a failed request (tritonclient errors carry it)."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        return re.sub(r"^in ensemble '[^']*', ", "", exc.message() or str(exc))
    return str(exc) or type(exc).__name__


def default_url(protocol: str) -> str:
    """localhost and the port run.sh and `f5-triton serve` serve on (`config.ServerConfig`): HTTP_PORT or GRPC_PORT
    where set, else 8000 or 8001."""
    return f"localhost:{environment_setting(DEFAULT_SERVER, f'{protocol}_port', os.environ)}"


def default_metrics_url(host: str = "localhost") -> str:
    """Triton's Prometheus endpoint on `host` at the port run.sh serves it on: METRICS_PORT, else 8002."""
    return f"http://{host}:{environment_setting(DEFAULT_SERVER, 'metrics_port', os.environ)}/metrics"


def add_request_args(parser: argparse.ArgumentParser, url: str, streaming: bool = False) -> None:
    parser.add_argument("--server-url", default=url, help="host:port of tritonserver (default: %(default)s)")
    parser.add_argument("--model-name", help="Triton model (default: f5_tts" + (
        f", or {STREAMING_MODEL} with --streaming)" if streaming else ")"))
    parser.add_argument("--reference-audio", required=True,
                        help="reference clip: wav, flac, ogg or mp3, any sample rate, 0.3-30 s (e.g. "
                        "examples/basic_ref_en.flac)")
    parser.add_argument("--reference-text", required=True, help="transcript of the reference clip")
    parser.add_argument("--target-text", required=True, help="text to speak")
    parser.add_argument("--output-audio", default="output.wav", help="wav file to write, 24 kHz (default: %(default)s)")
    parser.add_argument("--nfe-steps", type=int,
                        help=f"ODE steps (default: the server's, {DEFAULT_SAMPLING.nfe_steps} unless rendered otherwise)")
    parser.add_argument("--cfg-strength", type=float, help=f"guidance strength (default {DEFAULT_SAMPLING.cfg_strength})")
    parser.add_argument("--speed", type=float, help=f"speaking rate (default {DEFAULT_SAMPLING.speed})")
    parser.add_argument("--seed", type=int, help="noise seed for reproducible audio (default: random)")
    parser.add_argument("--timeout", type=float, help="seconds before the client gives up (default: none)")


def run_client(protocol: str, argv: list[str] | None = None) -> int:
    """Body of client_http.py / client_grpc.py: read the reference, request, write the wav.

    Prints the latency and real-time factor; a failed request is one line (the server's message) and
    exit status 1.
    """
    import soundfile as sf
    from tritonclient.utils import InferenceServerException

    from f5_triton.audio import read_audio
    from f5_triton.errors import InvalidInputError

    prog = f"client_{protocol}.py"
    parser = argparse.ArgumentParser(prog=prog, description=f"Speak a text in the voice of a reference clip, "
                                     f"through Triton over {protocol.upper()}.")
    try:
        url = default_url(protocol)
    except ValueError as exc:  # HTTP_PORT or GRPC_PORT is not a port
        parser.error(str(exc))
    add_request_args(parser, url, streaming=protocol == "grpc")
    if protocol == "grpc":
        parser.add_argument("--streaming", action="store_true",
                            help=f"stream from {STREAMING_MODEL}; reports the time to first audio")
    args = parser.parse_args(argv)
    streaming = getattr(args, "streaming", False)
    model = args.model_name or (STREAMING_MODEL if streaming else MODEL)
    try:
        wave, rate = read_audio(args.reference_audio)
        optional = dict(sample_rate=rate, nfe_steps=args.nfe_steps, cfg_strength=args.cfg_strength,
                        speed=args.speed, seed=args.seed)
        importlib.import_module(f"tritonclient.{protocol}")  # the client's import is not the request's latency
        start = time.perf_counter()
        if streaming:
            pieces, first = [], None
            for piece in stream_synthesize(args.server_url, wave, args.reference_text, args.target_text,
                                           model=model, timeout=args.timeout, **optional):
                if first is None and len(piece):
                    first = time.perf_counter() - start
                pieces.append(piece)
            audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        else:
            audio = synthesize(args.server_url, wave, args.reference_text, args.target_text, protocol=protocol,
                               model=model, timeout=args.timeout, **optional)
        latency = time.perf_counter() - start
    except (InferenceServerException, InvalidInputError, OSError, TimeoutError) as exc:
        print(f"{prog}: error: {server_message(exc)}", file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(args.output_audio) or ".", exist_ok=True)
    sf.write(args.output_audio, audio, SAMPLE_RATE)
    seconds = len(audio) / SAMPLE_RATE
    rtf = f"{latency / seconds:.3f}" if seconds else "n/a"
    print(f"wrote {args.output_audio}: {seconds:.2f} s of audio in {latency:.2f} s (RTF {rtf})")
    if streaming:
        ttfa = latency if first is None else first
        print(f"time to first audio: {1000 * ttfa:.0f} ms, {len(pieces)} pieces")
    try:
        with protocol_module(protocol).InferenceServerClient(args.server_url) as client:
            noise = random_weights(client, model)
    except (InferenceServerException, OSError):  # a server that does not show its config: no warning to give
        noise = False
    if noise:
        print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
    return 0
