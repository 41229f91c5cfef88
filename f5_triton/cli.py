"""`f5-triton` command line: synth (in process), serve (tritonserver on a model repository), gateway (the
OpenAI-style speech API in front of it)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from f5_triton.config import DTYPES
from f5_triton.errors import CheckpointError, InvalidInputError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--ckpt-dir", help="folder with model.* + vocab.txt + vocos/ (as make_random_checkpoint writes)")
    group.add_argument("--ckpt", help="checkpoint file (model_*.safetensors or .pt)")
    group.add_argument("--vocab", help="vocab.txt of the checkpoint")
    group.add_argument("--vocoder", help="Vocos folder (config.yaml + pytorch_model.bin)")
    group.add_argument("--arch", help="architecture name when no model.yaml is beside the checkpoint")


def resolve_model_paths(args) -> tuple[Path, Path, Path]:
    """--ckpt/--vocab/--vocoder, each defaulting to its place inside --ckpt-dir."""
    from f5_triton.checkpoints import find_checkpoint

    ckpt_dir = Path(args.ckpt_dir) if args.ckpt_dir else None
    if ckpt_dir is None and not (args.ckpt and args.vocab and args.vocoder):
        raise InvalidInputError("--ckpt-dir", "give --ckpt-dir, or all of --ckpt, --vocab and --vocoder")
    if ckpt_dir is not None and not ckpt_dir.is_dir():
        raise InvalidInputError("--ckpt-dir", f"{ckpt_dir} is not a folder")
    ckpt = Path(args.ckpt) if args.ckpt else find_checkpoint(ckpt_dir)
    vocab = Path(args.vocab) if args.vocab else ckpt.parent / "vocab.txt"
    if args.vocoder:
        vocoder = Path(args.vocoder)
    else:
        candidates = [ckpt_dir / "vocos", ckpt_dir.parent / "vocos-mel-24khz", ckpt_dir / "vocos-mel-24khz"]
        vocoder = next((c for c in candidates if c.is_dir()), candidates[0])
    return ckpt, vocab, vocoder


def cmd_synth(args) -> int:
    import soundfile as sf
    import torch

    from f5_triton.audio import read_audio
    from f5_triton.checkpoints import is_random_checkpoint
    from f5_triton.config import SAMPLE_RATE
    from f5_triton.engines import torch_dtype
    from f5_triton.pipeline import TTS
    from f5_triton.request import validate_request

    if args.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError("--device", "cuda was asked for but no CUDA GPU is visible")
    if args.dtype != "fp32" and args.device == "cpu":
        raise InvalidInputError("--dtype", f"{args.dtype} needs --device cuda; use fp32 on the CPU")
    ckpt, vocab, vocoder = resolve_model_paths(args)
    wave, rate = read_audio(args.ref_audio)
    request = validate_request(wave, args.ref_text, args.text, sample_rate=rate, nfe_steps=args.nfe,
                               cfg_strength=args.cfg, speed=args.speed, seed=args.seed)
    tts = TTS.from_paths(ckpt, vocab, vocoder, arch=args.arch, device=args.device,
                         dtype=torch_dtype(args.dtype))
    start = time.perf_counter()
    out = tts.synthesize([request])[0]
    latency = time.perf_counter() - start
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sf.write(args.output, out, SAMPLE_RATE)
    seconds = len(out) / SAMPLE_RATE
    print(f"wrote {args.output}: {seconds:.2f} s of audio at {SAMPLE_RATE} Hz in {latency:.2f} s "
          f"(RTF {latency / seconds:.3f}, model loading not counted)")
    if is_random_checkpoint(ckpt):
        print(f"WARNING: {ckpt} holds RANDOM WEIGHTS: the audio is noise, not speech", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from f5_triton.serving.launcher import TritonServer, run_forever

    repo = Path(args.model_repo)
    if not repo.is_dir():
        raise InvalidInputError("--model-repo", f"{repo} is not a folder; render one with scripts/build_model_repo.py")
    server = TritonServer(repo, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                          log_verbose=args.log_verbose, log_path=args.log_file)
    return run_forever(server, ready_timeout=args.ready_timeout)


GATEWAY_KEY_ENV = "F5_TRITON_GATEWAY_KEY"


def cmd_gateway(args) -> int:
    try:
        import uvicorn

        from f5_triton.gateway import GatewayConfig, create_app
    except ImportError as exc:
        raise InvalidInputError("gateway", f"needs the gateway extra ({exc.name} is missing): "
                                "pip install 'f5-triton[gateway]'") from None
    config = GatewayConfig(triton_url=args.triton_url, voices_dir=Path(args.voices), model=args.model,
                           streaming_model=args.streaming_model, timeout=args.timeout,
                           allow_upload=not args.no_upload, api_key=os.environ.get(GATEWAY_KEY_ENV) or None)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_serving_commands(sub: argparse._SubParsersAction) -> None:
    """serve (tritonserver on a model repository) and gateway (the OpenAI-style speech API in front of it)."""
    from f5_triton.client import default_url

    defaults = argparse.ArgumentDefaultsHelpFormatter
    serve = sub.add_parser("serve", help="start tritonserver on a model repository and wait until ready",
                           formatter_class=defaults)
    serve.add_argument("--model-repo", required=True, help="repository rendered by scripts/build_model_repo.py")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    serve.add_argument("--log-file", help="tritonserver log, appended to (default: a new temporary file)")
    serve.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for all models")
    serve.set_defaults(func=cmd_serve)

    gateway = sub.add_parser("gateway", help="OpenAI-compatible POST /v1/audio/speech in front of a running server",
                             formatter_class=defaults,
                             description=f"The OpenAI-style speech API and a page to try voices at http://HOST:PORT/. "
                             f"Set {GATEWAY_KEY_ENV} to require that API key (Bearer).")
    gateway.add_argument("--triton-url", default=default_url("grpc"),
                         help="gRPC host:port of tritonserver (GRPC_PORT sets the port)")
    gateway.add_argument("--voices", default="voices",
                         help="folder of <name>.wav + <name>.txt reference voices (made if missing; uploads go there)")
    gateway.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    gateway.add_argument("--port", type=int, default=int(os.environ.get("GATEWAY_PORT") or 8080),
                         help="HTTP port (GATEWAY_PORT sets it too)")
    gateway.add_argument("--model", default="f5_tts", help="Triton model for whole responses")
    gateway.add_argument("--streaming-model", default="f5_tts_streaming", help="Triton model for streamed responses")
    gateway.add_argument("--timeout", type=float, default=300.0, help="seconds per request (or per streamed piece)")
    gateway.add_argument("--no-upload", action="store_true", help="disable POST/DELETE /v1/voices")
    gateway.add_argument("--log-level", default="info", help="uvicorn's log level")
    gateway.set_defaults(func=cmd_gateway)


def build_parser() -> argparse.ArgumentParser:
    from f5_triton.config import DEFAULT_SAMPLING

    parser = argparse.ArgumentParser(prog="f5-triton", description="Serve F5-TTS with Triton Inference Server")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="speak a text in the voice of a reference clip, in process",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_args(synth)
    synth.add_argument("--ref-audio", required=True, help="reference clip (wav, flac, ogg or mp3; 3-15 s is best)")
    synth.add_argument("--ref-text", required=True, help="transcript of the reference clip")
    synth.add_argument("--text", required=True, help="text to speak")
    synth.add_argument("-o", "--output", default="out.wav", help="wav file to write")
    synth.add_argument("--nfe", type=int, default=DEFAULT_SAMPLING.nfe_steps, help="ODE steps (16 or 7: faster)")
    synth.add_argument("--cfg", type=float, default=DEFAULT_SAMPLING.cfg_strength, help="guidance strength")
    synth.add_argument("--speed", type=float, default=DEFAULT_SAMPLING.speed, help="speaking rate")
    synth.add_argument("--seed", type=int, default=None, help="noise seed (None: random)")
    synth.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    synth.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    synth.set_defaults(func=cmd_synth)

    add_serving_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InvalidInputError, CheckpointError) as exc:
        print(f"f5-triton: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
