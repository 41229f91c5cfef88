"""Soak: mixed-length load against a running server for minutes, with failures, latency percentiles per
minute, and the resident memory of the server and of every model process (plus GPU memory) over time.

`scripts/soak.py` is the command; the short CI run is in tests/test_load.py. A leak shows as memory
that keeps growing after the first minute (warm-up, caches filling): `Report.growth` measures it.
"""

from __future__ import annotations

import concurrent.futures
import json
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.bench import BUILTIN_REF_TEXT, BUILTIN_TARGETS, Item

SETTLE_S = 60.0  # memory is compared from the end of the first minute on


def mixed_items(wave: np.ndarray, sample_rate: int, count: int = 24) -> list[Item]:
    """`count` requests of mixed lengths: four reference lengths (a few, so the reference cache fills up in the
    first minute) times short, medium and long texts."""
    words = " ".join(BUILTIN_TARGETS).split()
    lengths = (4, 16, 40)  # words
    items = []
    for i in range(count):
        ref_seconds = min(len(wave) / sample_rate, 1.5 + (i % 4))
        n = lengths[i % len(lengths)]
        start = (7 * i) % (len(words) - n)
        text = " ".join(words[start:start + n]).rstrip(".,;") + "."
        items.append(Item(wave[: int(ref_seconds * sample_rate)], sample_rate, BUILTIN_REF_TEXT, text, f"mixed-{i}"))
    return items


def process_roles(server_pid: int) -> dict[int, str]:
    """The server and its python-backend stubs: pid -> 'tritonserver' or the stub's instance name."""
    import psutil

    roles = {server_pid: "tritonserver"}
    for child in psutil.Process(server_pid).children():
        try:
            argv = child.cmdline()
        except psutil.Error:
            continue
        if argv and argv[0].endswith("triton_python_backend_stub") and len(argv) > 8:
            roles[child.pid] = argv[8]  # the instance name, e.g. flow_matching_0_0
    return roles


class MemorySampler(threading.Thread):
    """Every `interval` s: RSS (MiB) of the server and each stub (found again each time: reloads make new
    ones), and used memory of each GPU when NVML is there. `samples` holds one dict per sample."""

    def __init__(self, server_pid: int, interval: float = 5.0):
        super().__init__(name="soak-memory", daemon=True)
        self.server_pid, self.interval = server_pid, interval
        self.samples: list[dict] = []
        self._done = threading.Event()
        self._start = time.monotonic()
        self._nvml = _nvml_handles()

    def sample(self) -> dict:
        import psutil

        rss = {}
        for pid, role in process_roles(self.server_pid).items():
            try:
                rss[role] = rss.get(role, 0.0) + psutil.Process(pid).memory_info().rss / 2**20
            except psutil.Error:
                continue
        row = {"t": time.monotonic() - self._start, "rss_mib": rss}
        if self._nvml:
            import pynvml

            row["gpu_used_mib"] = {f"gpu{i}": pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
                                   for i, h in enumerate(self._nvml)}
        return row

    def run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._done.wait(self.interval):
                self.samples.append(self.sample())
                return

    def stop(self) -> None:
        self._done.set()
        self.join()


def _nvml_handles() -> list:
    try:
        import pynvml

        pynvml.nvmlInit()
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # no NVML (CPU machine, missing package): no GPU memory
        return []


@dataclass
class Outcome:
    start: float  #: seconds since the soak began
    latency: float
    error: str | None = None


@dataclass
class Report:
    seconds: float
    concurrency: int
    outcomes: list[Outcome] = field(repr=False)
    memory: list[dict] = field(repr=False)
    killed_at: float | None = None  #: when a flow_matching stub was killed (`soak(kill_after=...)`)

    @property
    def recovery_s(self) -> float | None:
        """Seconds from the kill to the first answer to a request sent after it."""
        if self.killed_at is None:
            return None
        served = [o.start + o.latency for o in self.outcomes if o.error is None and o.start >= self.killed_at]
        return min(served) - self.killed_at if served else None

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    def per_minute(self) -> list[dict]:
        rows = []
        last = max((o.start for o in self.outcomes), default=0.0)
        for minute in range(int(last // 60) + 1):
            inside = [o for o in self.outcomes if minute * 60 <= o.start < (minute + 1) * 60]
            latencies = [o.latency for o in inside if o.error is None]
            row = {"minute": minute + 1, "requests": len(inside), "failures": sum(o.error is not None for o in inside)}
            for q in (50, 90, 99):
                row[f"p{q}_s"] = float(np.percentile(latencies, q)) if latencies else None
            rows.append(row)
        return rows

    def growth(self, key: str = "rss_mib", settle_s: float = SETTLE_S) -> dict[str, float]:
        """Relative growth of each process (and their total) from the first sample after `settle_s` to the
        last sample; processes that were not there at both times (a reloaded model) are left out."""
        settled = next((s for s in self.memory if s["t"] >= settle_s), None)
        if settled is None or settled is self.memory[-1]:
            return {}
        first, last = settled.get(key, {}), self.memory[-1].get(key, {})
        common = sorted(set(first) & set(last))
        growth = {name: last[name] / first[name] - 1.0 for name in common if first[name] > 0}
        if common:
            growth["total"] = sum(last[n] for n in common) / sum(first[n] for n in common) - 1.0
        return growth

    def summary(self) -> dict:
        latencies = [o.latency for o in self.outcomes if o.error is None]
        refusals = [o.latency for o in self.failures]
        return {"seconds": self.seconds, "concurrency": self.concurrency, "requests": len(self.outcomes),
                "failures": len(self.failures), "errors": sorted({o.error for o in self.failures})[:10],
                "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
                "p99_s": float(np.percentile(latencies, 99)) if latencies else None,
                "failure_p99_s": float(np.percentile(refusals, 99)) if refusals else None,
                "killed_at_s": self.killed_at, "recovery_s": self.recovery_s,
                "per_minute": self.per_minute(), "rss_growth_after_first_minute": self.growth(),
                "gpu_growth_after_first_minute": self.growth("gpu_used_mib"), "memory": self.memory}

    def write(self, json_path: str | Path, plot_path: str | Path | None = None) -> None:
        Path(json_path).write_text(json.dumps({**self.summary(), "outcomes": [asdict(o) for o in self.outcomes]},
                                              indent=1))
        if plot_path is not None:
            self.plot(plot_path)

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from benchmarks.bench import _save

        fig, (lat, mem) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
        rows = self.per_minute()
        mid = [(r["minute"] - 0.5) * 60 for r in rows]
        for q in (50, 90, 99):
            lat.plot(mid, [r[f"p{q}_s"] for r in rows], marker="o", label=f"p{q}")
        failed = [o.start for o in self.failures]
        if failed:
            lat.plot(failed, [0] * len(failed), "rx", label="failures")
        lat.set_ylabel("latency (s)")
        lat.legend()
        lat.set_title(f"soak: {len(self.outcomes)} requests at concurrency {self.concurrency}, "
                      f"{len(self.failures)} failed")
        names = sorted({n for s in self.memory for n in s["rss_mib"]})
        for name in names:
            mem.plot([s["t"] for s in self.memory], [s["rss_mib"].get(name) for s in self.memory], label=name)
        for gpu in sorted({g for s in self.memory for g in s.get("gpu_used_mib", {})}):
            mem.plot([s["t"] for s in self.memory], [s["gpu_used_mib"].get(gpu) for s in self.memory], "--",
                     label=f"{gpu} used")
        mem.set_xlabel("seconds")
        mem.set_ylabel("MiB (RSS; GPU dashed)")
        mem.legend(fontsize=7, ncol=2)
        return _save(fig, path)


def kill_flow_stub(server_pid: int) -> int:
    """SIGKILL an active flow_matching stub (as the OOM killer would); returns its pid."""
    import os
    import signal

    pid = next(pid for pid, role in process_roles(server_pid).items()
               if role.startswith("flow_matching_") and "standby" not in role)
    os.kill(pid, signal.SIGKILL)
    return pid


def soak(url: str, server_pid: int, items: list[Item], seconds: float, concurrency: int = 4,
         protocol: str = "grpc", memory_interval: float = 5.0, timeout: float = 120.0,
         kill_after: float | None = None, **optional) -> Report:
    """Send `items` round-robin from `concurrency` threads for `seconds` (each request its own seed);
    no retries, so that every failure is counted; a thread whose request failed pauses as the bundled client
    would before a retry (else refused requests come back at once, and a storm of refusals starves the host).
    `kill_after`: kill a flow_matching stub that many seconds in (`Report.recovery_s`)."""
    from f5_triton.client import RETRY_BACKOFF_S, protocol_module, synthesize

    module = protocol_module(protocol)
    sampler = MemorySampler(server_pid, memory_interval)
    outcomes: list[Outcome] = []
    counter = iter(range(10**9))
    lock = threading.Lock()
    begin = time.monotonic()

    def worker() -> None:
        with module.InferenceServerClient(url) as client:
            while (start := time.monotonic()) - begin < seconds:
                with lock:
                    i = next(counter)
                item = items[i % len(items)]
                error = None
                try:
                    synthesize(url, item.wave, item.reference_text, item.target_text, protocol=protocol,
                               timeout=timeout, client=client, retries=0, sample_rate=item.sample_rate, seed=i,
                               **optional)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {getattr(exc, 'message', lambda: str(exc))()}"
                with lock:
                    outcomes.append(Outcome(start - begin, time.monotonic() - start, error))
                if error is not None:
                    time.sleep(RETRY_BACKOFF_S * (1.0 + random.random()))

    killed_at: list[float] = []

    def kill() -> None:
        kill_flow_stub(server_pid)
        killed_at.append(time.monotonic() - begin)

    killer = threading.Timer(kill_after, kill) if kill_after is not None else None
    sampler.start()
    try:
        if killer is not None:
            killer.start()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(concurrency)]:
                future.result()
    finally:
        if killer is not None:
            killer.cancel()
        sampler.stop()
    return Report(time.monotonic() - begin, concurrency, sorted(outcomes, key=lambda o: o.start), sampler.samples,
                  killed_at[0] if killed_at else None)
