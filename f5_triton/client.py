"""Client side: build KServe v2 requests for the `f5_tts` model and send them with tritonclient.

`client_http.py`, `client_grpc.py`, `benchmark.py` and the tests all go through here, so the wire
format (names and dtypes from f5_triton.serving.schema) is written once.
"""

from __future__ import annotations

import argparse
from types import ModuleType

import numpy as np

from f5_triton.config import DEFAULT_SAMPLING, SAMPLE_RATE
from f5_triton.serving.schema import INPUTS

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
               model: str = "f5_tts", timeout: float | None = None, client=None, **optional) -> np.ndarray:
    """Send one request and return the 24 kHz waveform. Pass `client` to reuse a connection."""
    module = protocol_module(protocol)
    inputs = build_inputs(module, wave, reference_text, target_text, **optional)
    outputs = [module.InferRequestedOutput("waveform")]
    kwargs = {"client_timeout": timeout} if timeout is not None else {}
    if client is not None:
        return client.infer(model, inputs, outputs=outputs, **kwargs).as_numpy("waveform").reshape(-1)
    with module.InferenceServerClient(url) as own:
        return own.infer(model, inputs, outputs=outputs, **kwargs).as_numpy("waveform").reshape(-1)


def add_request_args(parser: argparse.ArgumentParser, default_url: str) -> None:
    parser.add_argument("--server-url", default=default_url, help="host:port of tritonserver")
    parser.add_argument("--model-name", default="f5_tts")
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
    args = parser.parse_args(argv)
    wave, rate = read_audio(args.reference_audio)
    audio = synthesize(args.server_url, wave, args.reference_text, args.target_text, protocol=protocol,
                       model=args.model_name, timeout=args.timeout, sample_rate=rate, nfe_steps=args.nfe_steps,
                       cfg_strength=args.cfg_strength, speed=args.speed, seed=args.seed)
    sf.write(args.output_audio, audio, SAMPLE_RATE)
    print(f"wrote {args.output_audio}: {len(audio) / SAMPLE_RATE:.2f} s")
