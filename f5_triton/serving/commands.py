"""Serving subcommands of the `f5-triton` CLI: serve (tritonserver on a model repository)."""

from __future__ import annotations

import argparse


def cmd_serve(args) -> int:
    from pathlib import Path

    from f5_triton.errors import InvalidInputError
    from f5_triton.serving.launcher import TritonServer, run_forever

    repo = Path(args.model_repo)
    if not repo.is_dir():
        raise InvalidInputError("--model-repo", f"{repo} is not a folder; render one with scripts/build_model_repo.py")
    server = TritonServer(repo, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                          log_verbose=args.log_verbose, log_path=args.log_file)
    return run_forever(server, ready_timeout=args.ready_timeout)


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="start tritonserver on a model repository and wait until ready")
    serve.add_argument("--model-repo", required=True, help="repository rendered by scripts/build_model_repo.py")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument("--log-verbose", type=int, default=0)
    serve.add_argument("--log-file", help="tritonserver log, appended to (default: a new temporary file)")
    serve.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for all models")
    serve.set_defaults(func=cmd_serve)
