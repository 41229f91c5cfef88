"""Client side: build KServe v2 requests for the `f5_tts` model and send them with tritonclient.

`client_http.py`, `client_grpc.py`, `benchmark.py`, the gateway and the tests all go through here,
so the wire format (names and dtypes from f5_triton.request) is written once.
`stream_synthesize` talks to the decoupled `f5_tts_streaming` model over a gRPC stream.
"""

from __future__ import annotations

import argparse
import queue
import time
from collections.abc import Iterator
from types import ModuleType

import numpy as np

from f5_triton.config import DEFAULT_SAMPLING, SAMPLE_RATE
from f5_triton.request import INPUTS, MODEL, OUTPUTS, STREAM_OUTPUTS, STREAMING_MODEL

NUMPY_TYPES = {"TYPE_FP32": np.float32, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_STRING": object}
WIRE_TYPES = {"TYPE_FP32": "FP32", "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_STRING": "BYTES"}
FIELDS = {f.name: f for f in INPUTS}



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
               model: str = MODEL, timeout: float | None = None, client=None, **optional) -> np.ndarray:
    """Send one request and return the 24 kHz waveform. Pass `client` to reuse a connection."""
    module = protocol_module(protocol)
    inputs = build_inputs(module, wave, reference_text, target_text, **optional)
    outputs = [module.InferRequestedOutput("waveform")]
    kwargs = {"client_timeout": timeout} if timeout is not None else {}
    if client is not None:
        return client.infer(model, inputs, outputs=outputs, **kwargs).as_numpy("waveform").reshape(-1)
    with module.InferenceServerClient(url) as own:
        return own.infer(model, inputs, outputs=outputs, **kwargs).as_numpy("waveform").reshape(-1)


def stream_synthesize(url: str, wave: np.ndarray, reference_text: str, target_text: str,
                      model: str = STREAMING_MODEL, timeout: float | None = None, **optional) -> Iterator[np.ndarray]:
    """Pieces of the 24 kHz waveform from the streaming model, as they arrive (gRPC).

    Joined, they are the request's audio. `timeout` bounds the wait for each piece. Closing the
    generator early cancels the request on the server.
    """
    import tritonclient.grpc as grpcclient

    inputs = build_inputs(grpcclient, wave, reference_text, target_text, **optional)
    outputs = [grpcclient.InferRequestedOutput(f.name) for f in STREAM_OUTPUTS]
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


def add_request_args(parser: argparse.ArgumentParser, default_url: str) -> None:
    parser.add_argument("--server-url", default=default_url, help="host:port of tritonserver")
    parser.add_argument("--model-name", help=f"default f5_tts, or {STREAMING_MODEL} with --streaming")
    parser.add_argument("--reference-audio", required=True, help="reference clip (any common sample rate)")
    parser.add_argument("--reference-text", required=True, help="transcript of the reference clip")
    parser.add_argument("--target-text", required=True, help="text to speak")
    parser.add_argument("--output-audio", default="output.wav")
    parser.add_argument("--nfe-steps", type=int, help=f"ODE steps (server default, usually {DEFAULT_SAMPLING.nfe_steps})")
    parser.add_argument("--cfg-strength", type=float)
    parser.add_argument("--speed", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--timeout", type=float, help="seconds before the client gives up")


def run_client(protocol: str, argv: list[str] | None = None) -> None:
    """Body of client_http.py / client_grpc.py: read the reference, request, write the wav."""
    import soundfile as sf

    from f5_triton.audio import read_audio

    parser = argparse.ArgumentParser(description=f"F5-TTS over Triton {protocol.upper()}")
    add_request_args(parser, "localhost:8000" if protocol == "http" else "localhost:8001")
    if protocol == "grpc":
        parser.add_argument("--streaming", action="store_true",
                            help=f"stream from {STREAMING_MODEL}; reports the time to first audio")
    args = parser.parse_args(argv)
    wave, rate = read_audio(args.reference_audio)
    optional = dict(sample_rate=rate, nfe_steps=args.nfe_steps, cfg_strength=args.cfg_strength, speed=args.speed,
                    seed=args.seed)
    if getattr(args, "streaming", False):
        start = time.perf_counter()
        pieces, first = [], None
        for piece in stream_synthesize(args.server_url, wave, args.reference_text, args.target_text,
                                       model=args.model_name or STREAMING_MODEL, timeout=args.timeout, **optional):
            if first is None and len(piece):
                first = time.perf_counter() - start
            pieces.append(piece)
        total = time.perf_counter() - start
        audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        print(f"time to first audio: {1000 * (total if first is None else first):.0f} ms, "
              f"{len(pieces)} pieces, total {1000 * total:.0f} ms")
    else:
        audio = synthesize(args.server_url, wave, args.reference_text, args.target_text, protocol=protocol,
                           model=args.model_name or MODEL, timeout=args.timeout, **optional)
    sf.write(args.output_audio, audio, SAMPLE_RATE)
    print(f"wrote {args.output_audio}: {len(audio) / SAMPLE_RATE:.2f} s")
