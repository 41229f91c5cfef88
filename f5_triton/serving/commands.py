"""Serving subcommands of the `f5-triton` CLI: serve (tritonserver on a model repository), gateway
(the OpenAI-compatible speech API in front of it)."""

from __future__ import annotations

import argparse
import os

from f5_triton.client import default_url

from f5_triton.errors import InvalidInputError


def cmd_serve(args) -> int:
    from pathlib import Path

    from f5_triton.serving.launcher import TritonServer, run_forever

    repo = Path(args.model_repo)
    if not repo.is_dir():
        raise InvalidInputError("--model-repo", f"{repo} is not a folder; render one with scripts/build_model_repo.py")
    server = TritonServer(repo, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                          log_verbose=args.log_verbose, log_path=args.log_file)
    return run_forever(server, ready_timeout=args.ready_timeout)


GATEWAY_KEY_ENV = "F5_TRITON_GATEWAY_KEY"


def cmd_gateway(args) -> int:
    import os
    from pathlib import Path

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


def add_subcommands(sub: argparse._SubParsersAction) -> None:
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
