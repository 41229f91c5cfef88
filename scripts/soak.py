#!/usr/bin/env python3
"""Soak a server: mixed-length requests for N minutes; failures, latency percentiles per minute, and the
resident memory of tritonserver and every model process (GPU memory where NVML is there) over time.

Against a running server (its pid is found from the listening port when --server-pid is not given):
    python scripts/soak.py --server-url localhost:8001 --minutes 10 --concurrency 8 --json soak.json --plot soak.png
Or start one on a repository first (scripts/build_model_repo.py):
    python scripts/soak.py --model-repo model_repo_cpu --minutes 10 --json soak.json --plot soak.png

Also for faults and overload: --kill-after 60 kills a flow_matching process a minute in (failures and the
recovery time in the report); a --concurrency far beyond the queue limits shows refusals and the p99 of
the admitted requests.

Exit status 1 when a request failed or the memory grew by more than --max-growth after the first minute.
"""

import argparse
import contextlib
import json
import sys

import _checkout  # noqa: F401  (benchmarks/ beside the package)
from benchmarks import soak
from benchmarks.bench import synthetic_reference
from f5_triton.audio import read_audio
from f5_triton.config import SAMPLE_RATE


def listening_pid(port: int) -> int:
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return conn.pid
    raise SystemExit(f"no process listens on port {port}; pass --server-pid")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--server-url", help="gRPC host:port of a running tritonserver")
    where.add_argument("--model-repo", help="start tritonserver on this repository for the soak")
    parser.add_argument("--server-pid", type=int, help="pid of the running tritonserver (default: from the port)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--reference-audio", help="reference clip (default: synthetic speech-like noise)")
    parser.add_argument("--nfe-steps", type=int, help="ODE steps per request (server default if not given)")
    parser.add_argument("--memory-interval", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth after the first minute")
    parser.add_argument("--kill-after", type=float,
                        help="SIGKILL a flow_matching stub this many seconds in; reports the recovery time")
    parser.add_argument("--json", default="soak.json")
    parser.add_argument("--plot", help="PNG of latency percentiles and memory over time")
    args = parser.parse_args()

    if args.reference_audio:
        wave, rate = read_audio(args.reference_audio)
    else:
        wave, rate = synthetic_reference(5.0), SAMPLE_RATE
    items = soak.mixed_items(wave, rate)
    with contextlib.ExitStack() as stack:
        if args.model_repo:
            from f5_triton.supervisor.server import TritonServer, free_port

            server = stack.enter_context(TritonServer(args.model_repo, http_port=free_port(), grpc_port=free_port(),
                                                      metrics_port=free_port()))
            url, pid = server.urls.grpc, server.pid
        else:
            url = args.server_url
            pid = args.server_pid or listening_pid(int(url.rsplit(":", 1)[1]))
        report = soak.soak(url, pid, items, args.minutes * 60, concurrency=args.concurrency,
                           memory_interval=args.memory_interval, kill_after=args.kill_after,
                           nfe_steps=args.nfe_steps)
    report.write(args.json, args.plot)
    summary = {k: v for k, v in report.summary().items() if k != "memory"}
    print(json.dumps(summary, indent=1))
    growth = report.growth().get("total", 0.0)
    return 1 if report.failures or growth > args.max_growth else 0


if __name__ == "__main__":
    sys.exit(main())
