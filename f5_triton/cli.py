"""`f5-triton` command line: synth (in process), serve / status / stop (tritonserver on a model repository,
through f5_triton.supervisor), build (run.sh's stages 0-3, through f5_triton.build), gateway (the OpenAI-style
speech API in front of a server)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from f5_triton.build import BuildError
from f5_triton.config import DEFAULT_LIMITS, DEFAULT_SERVER, DTYPES, ServerConfig
from f5_triton.errors import CheckpointError, InvalidInputError
from f5_triton.flags import add_flags, flags_values, setting_flags
from f5_triton.model_paths import add_model_args, resolve_model_paths
from f5_triton.supervisor.errors import TritonServerError


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
    from f5_triton.supervisor.server import TritonServer
    from f5_triton.supervisor.service import PidFile, detach, run_forever

    repo = Path(args.model_repo)
    if not repo.is_dir():
        raise InvalidInputError("--model-repo", f"{repo} is not a folder; render one with scripts/build_model_repo.py")
    config = ServerConfig(**flags_values(SERVE_FLAGS, args))
    if args.detach:
        serve_args = ["--model-repo", str(repo)]
        for flag in SERVE_FLAGS:
            serve_args += flag.arguments(getattr(config, flag.option))
        for flag, value in (("--log-file", args.log_file), ("--pid-file", args.pid_file)):
            if value:
                serve_args += [flag, str(value)]
        pid = detach(serve_args, Path(args.detach), config.ready_timeout_seconds)
        print(f"f5-triton: server ready in the background (pid {pid}, output in {args.detach})")
        return 0
    pid_file = PidFile(args.pid_file) if args.pid_file else None
    if pid_file is not None:
        pid_file.write()
    try:
        server = TritonServer(repo, bind_address=config.host, http_port=config.http_port, grpc_port=config.grpc_port,
                              metrics_port=config.metrics_port, log_verbose=config.log_verbose, log_path=args.log_file)
        return run_forever(server, ready_timeout=config.ready_timeout_seconds)
    finally:
        if pid_file is not None:
            pid_file.remove(only_pid=os.getpid())


def cmd_stop(args) -> int:
    from f5_triton.supervisor.service import PidFile, stop

    stop(PidFile(args.pid_file), timeout=args.timeout)
    return 0


def cmd_status(args) -> int:
    from f5_triton.supervisor.service import PidFile

    pid = PidFile(args.pid_file).running_pid()
    if pid is None:
        print(f"no server running (pid file {args.pid_file})", file=sys.stderr)
        return 1
    print(pid)
    return 0


GATEWAY_KEY_ENV = "F5_TRITON_GATEWAY_KEY"
#: `f5-triton serve`'s flags, each a setting of `config.ServerConfig` with its environment name (HTTP_PORT, ...).
SERVE_FLAGS = setting_flags(ServerConfig)
GRPC_PORT_ENV = next(flag.env for flag in SERVE_FLAGS if flag.option == "grpc_port")


def cmd_gateway(args) -> int:
    try:
        import uvicorn

        from f5_triton.client import default_url
        from f5_triton.gateway import GatewayConfig, create_app
    except ImportError as exc:
        raise InvalidInputError("gateway", f"needs the gateway extra ({exc.name} is missing): "
                                "pip install 'f5-triton[gateway]'") from None
    try:
        triton_url = args.triton_url or default_url("grpc")
    except ValueError as exc:  # GRPC_PORT is not a port
        raise InvalidInputError("--triton-url", str(exc)) from None
    config = GatewayConfig(triton_url=triton_url, voices_dir=Path(args.voices), model=args.model,
                           streaming_model=args.streaming_model, timeout=args.timeout,
                           allow_upload=not args.no_upload, api_key=os.environ.get(GATEWAY_KEY_ENV) or None)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_serving_commands(sub: argparse._SubParsersAction) -> None:
    """serve (tritonserver on a model repository) and gateway (the OpenAI-style speech API in front of it)."""
    defaults = argparse.ArgumentDefaultsHelpFormatter
    serve = sub.add_parser("serve", help="start tritonserver on a model repository and wait until ready",
                           formatter_class=defaults)
    serve.add_argument("--model-repo", required=True, help="repository rendered by scripts/build_model_repo.py")
    add_flags(serve, SERVE_FLAGS, os.environ)
    serve.add_argument("--log-file", help="tritonserver log, appended to (default: a new temporary file)")
    serve.add_argument("--pid-file", help="write this process's pid there while it runs (for f5-triton stop)")
    serve.add_argument("--detach", metavar="LOG", help="run in the background, in a session of its own, its output "
                       "appended to LOG; return once the server is ready")
    serve.set_defaults(func=cmd_serve)

    stop = sub.add_parser("stop", help="stop the server whose pid file is given (SIGTERM, SIGKILL after --timeout)",
                          formatter_class=defaults)
    stop.add_argument("--pid-file", required=True, help="the --pid-file of f5-triton serve")
    stop.add_argument("--timeout", type=float, default=90.0, help="seconds for in-flight requests before SIGKILL")
    stop.set_defaults(func=cmd_stop)

    status = sub.add_parser("status", help="print the pid of the server whose pid file is given; exit 1 if none runs")
    status.add_argument("--pid-file", required=True, help="the --pid-file of f5-triton serve")
    status.set_defaults(func=cmd_status)

    gateway = sub.add_parser("gateway", help="OpenAI-compatible POST /v1/audio/speech in front of a running server",
                             formatter_class=defaults,
                             description=f"The OpenAI-style speech API and a page to try voices at http://HOST:PORT/. "
                             f"Set {GATEWAY_KEY_ENV} to require that API key (Bearer).")
    gateway.add_argument("--triton-url", help=f"gRPC host:port of tritonserver; None: localhost, port "
                         f"${GRPC_PORT_ENV} or {DEFAULT_SERVER.grpc_port}")
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


def _engine_dir(args) -> Path:
    from f5_triton.build import engine_dir

    if args.engine_dir:
        return Path(args.engine_dir)
    if not (args.engine_root and args.label):
        raise BuildError("give --engine-dir, or --engine-root and --label")
    return engine_dir(Path(args.engine_root), args.label)


def _environment_arguments() -> list[str]:
    """scripts/build_model_repo.py flags for the repository options the environment sets (`F5_REPO_<FLAG>`)."""
    from f5_triton.repository import environment_arguments

    try:
        return environment_arguments(os.environ)
    except ValueError as exc:
        raise BuildError(str(exc)) from None


def cmd_build(args) -> int:
    from f5_triton import build

    if args.step == "checkpoint":
        build.prepare_checkpoint(args.model, Path(args.ckpt_dir), Path(args.model_dir or Path(args.ckpt_dir) / args.model),
                                 random_weights=args.random_weights)
    elif args.step == "backend":
        if args.model and args.model not in build.known_models():
            raise BuildError(f"unknown model '{args.model}': {', '.join(build.known_models())}")
        print(*build.choose_backend(args.backend, args.target))
    elif args.step == "engine-dir":
        print(_engine_dir(args))
    elif args.step in ("dit", "vocoder"):
        network = "dit_step" if args.step == "dit" else "vocoder"
        precision = "fp32" if args.dtype == "fp32" else "fp16"
        engines = _engine_dir(args)
        files = build.ModelFiles.require(Path(args.model_dir))
        build.export_onnx(network, files, Path(args.onnx_dir), precision, arch=args.arch)
        build.build_plan(network, Path(args.onnx_dir), engines, build.engine_batches(args.max_batch_size)[network],
                         precision, max_frames=args.max_frames, workspace_gib=args.workspace_gib)
    else:  # repository
        settings = build.RepositorySettings(
            args.backend, args.target, arch=args.arch, engines=_engine_dir(args) if args.backend == "trt" else None,
            max_batch_size=args.max_batch_size, nfe=args.nfe, dtype=args.dtype, gpus=args.gpus,
            flow_instances=args.flow_instances, extra=(*_environment_arguments(), *args.repo_args.split()))
        build.render_repository(Path(args.output), Path(args.model_dir), settings)
    return 0


def add_build_commands(sub: argparse._SubParsersAction) -> None:
    """build checkpoint|dit|vocoder|repository|engine-dir|backend: run.sh's stages 0-3, each made only when stale."""
    defaults = argparse.ArgumentDefaultsHelpFormatter
    build = sub.add_parser("build", help="make what a server needs, each step only when it is stale (run.sh stages 0-3)")
    steps = build.add_subparsers(dest="step", required=True)

    def step(name: str, help: str) -> argparse.ArgumentParser:
        parser = steps.add_parser(name, help=help, formatter_class=defaults)
        parser.set_defaults(func=cmd_build)
        return parser

    def engine_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--engine-dir", help="folder of the plans (default: ENGINE_ROOT/LABEL/<engine key>)")
        parser.add_argument("--engine-root", help="engine cache, one folder per model and engine key")
        parser.add_argument("--label", help="the model's folder name in the engine cache")

    def model_args(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model-dir", required=True, help="checkpoint folder (model_*.safetensors, vocab.txt)")
        parser.add_argument("--arch", help="architecture when no model.yaml is beside the checkpoint")
        parser.add_argument("--max-batch-size", type=int, help="flow-matching batch (default: the repository's)")
        parser.add_argument("--dtype", choices=sorted(DTYPES), help="precision (engines: fp16 unless fp32)")

    checkpoint = step("checkpoint", "stage 0: find the checkpoint, or download it, or write a random one")
    checkpoint.add_argument("--model", required=True, help="published model name (F5TTS_v1_Base, ...)")
    checkpoint.add_argument("--ckpt-dir", required=True, help="checkpoints folder (downloads go there)")
    checkpoint.add_argument("--model-dir", help="the model's folder (default: CKPT_DIR/MODEL)")
    checkpoint.add_argument("--random-weights", action="store_true", help="a random tiny checkpoint: NOT speech")

    for name, what in (("dit", "stage 1: the DiT step"), ("vocoder", "stage 2: the vocoder")):
        network = step(name, f"{what}: ONNX export and TensorRT plan, each only when stale")
        model_args(network)
        network.add_argument("--onnx-dir", required=True, help="folder of the ONNX files")
        engine_args(network)
        network.add_argument("--max-frames", type=int, default=DEFAULT_LIMITS.max_mel_frames,
                             help="longest mel the plans take")
        network.add_argument("--workspace-gib", type=float, default=4.0, help="TensorRT builder workspace")

    repository = step("repository", "stage 3: render the model repository, only when stale")
    repository.add_argument("--output", required=True, help="repository folder (replaced)")
    model_args(repository)
    repository.add_argument("--backend", choices=["torch", "trt"], required=True)
    repository.add_argument("--target", choices=["cpu", "gpu"], required=True)
    engine_args(repository)
    repository.add_argument("--nfe", type=int, help="default ODE steps")
    repository.add_argument("--gpus", help="GPU ids, e.g. 0,1")
    repository.add_argument("--flow-instances", type=int, help="flow-matching instances per device")
    repository.add_argument("--repo-args", default="", help="further scripts/build_model_repo.py arguments, split "
                            "on spaces (--repo-args='--no-streaming ...'); each of them is also read from the "
                            "environment as F5_REPO_<FLAG> (F5_REPO_FIRST_CHUNK_BYTES=30), which --repo-args overrides")

    directory = step("engine-dir", "print the folder of this machine's plans of a model")
    engine_args(directory)

    backend = step("backend", "print the backend and target to use here: trt gpu, torch gpu or torch cpu")
    backend.add_argument("--backend", default="auto", help="auto, torch or trt")
    backend.add_argument("--target", default="", help="cpu or gpu (default: gpu when one is visible)")
    backend.add_argument("--model", help="check that this model name is known")


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
    add_build_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InvalidInputError, CheckpointError, BuildError, TritonServerError) as exc:
        print(f"f5-triton: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
