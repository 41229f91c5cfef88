"""``f5-triton serve`` as a service: in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

from f5_triton.supervisor.server import TritonServer


def run_forever(server: TritonServer, ready_timeout: float | None = None) -> int:
    """Start ``server`` if needed, announce readiness and serve until Ctrl-C / SIGTERM.

    Prints ``f5-triton: server ready  http=... grpc=... metrics=...`` once ready.
    On SIGINT or SIGTERM the server is stopped gracefully and 0 is returned; if
    the server dies on its own, its log tail goes to stderr and its exit status
    (or 1) is returned. Must run in the main thread (it installs a SIGTERM handler).
    """
    stop_requested = threading.Event()

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        stop_requested.set()

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if server.pid is None:
            server.start()
        server.wait_ready(server.ready_timeout if ready_timeout is None else ready_timeout)
        urls = server.urls
        print(f"f5-triton: server ready  http={urls.http} grpc={urls.grpc} metrics={urls.metrics}", flush=True)
        while not stop_requested.wait(0.5):
            code = server.returncode
            if code is not None:
                print(
                    f"f5-triton: tritonserver exited with status {code} (log: {server.log_path}):\n"
                    f"{server.log_tail()}",
                    file=sys.stderr,
                    flush=True,
                )
                return code or 1
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        try:
            server.stop()
        except KeyboardInterrupt:  # a second Ctrl-C while shutting down: do not wait any longer
            print("f5-triton: interrupted again, killing tritonserver", file=sys.stderr, flush=True)
            server.kill()
        finally:
            signal.signal(signal.SIGTERM, previous)
