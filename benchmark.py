#!/usr/bin/env python3
"""Benchmark F5-TTS inference: RTF, latency percentiles, throughput, per-stage time, GPU memory.

Offline (in process, batched):
    python benchmark.py --mode offline --ckpt-dir ckpts/F5TTS_v1_Base --batch-size 4 --nfe 16 --device cuda
    python benchmark.py --mode offline --random-weights F5TTS_v1_Base --device cuda --dtype fp16 --nfe 16
Server (a running Triton, gRPC or HTTP, a concurrency sweep):
    python benchmark.py --mode server --server-url localhost:8001 --concurrency 1,4,16 --num-requests 64
Streaming (f5_tts_streaming over Triton's gRPC stream, or --mode offline: the stream scheduler in process):
time to first audio and whole-request percentiles, aggregate audio s/s; --passes 2: a cold then a warm sweep
    python benchmark.py --mode server --streaming --concurrency 1,4,8,16,32 --num-requests 64 --passes 2
    python benchmark.py --mode offline --streaming --random-weights F5TTS_v1_Base --concurrency 1,8 --granularity chunk
Open loop (server, streamed or whole responses): requests arrive as a seeded Poisson process of --request-rate per
second whatever the server is doing (a comma list sweeps; inf: all at once); per rate first audio, whole request,
stalls, refusals, the server's queue (--metrics-url), goodput within --first-audio-budget, and the capacity
    python benchmark.py --mode server --streaming --request-rate 2,4,8,16 --num-requests 32 --set mixed --plot rate.png

Inputs: --dataset (a folder of <name>.wav/.txt/.target.txt or a JSONL), else a built-in --set:
"uniform" (~5 s reference, ~10 s of generated speech each) or "mixed" (references of 3-10 s, targets
of 2-20 s, drawn deterministically: what real traffic looks like). --passes 2 runs the set twice and
reports each pass: the first one right after start-up ("cold": new shapes) and the second ("warm");
offline, --server-warmup first does what a server does before "ready" (compiles, every CUDA graph) and
prints how long it took. Numbers go to stdout as a table, to --output-json,
and a sweep to --plot (PNG).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from benchmarks import bench
from f5_triton.client import default_metrics_url, default_url
from f5_triton.config import DEFAULT_SAMPLING, DEFAULT_SCHEDULER, SAMPLE_RATE
from f5_triton.request import MODEL, STREAMING_MODEL


def parse_args(argv=None):
    from f5_triton.model_paths import add_model_args

    class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--mode", choices=["offline", "server"], default="offline")
    p.add_argument("--dataset", help="folder or JSONL of (reference audio, reference text, target text)")
    p.add_argument("--set", help=f"built-in input set(s) without --dataset: {', '.join(bench.BUILTIN_SETS)}, or a "
                                 "comma list (None: uniform; paragraphs with --streaming)")
    p.add_argument("--reference-audio", help="uniform and paragraphs sets: use this reference clip instead of a synthetic one")
    p.add_argument("--passes", type=int, default=1,
                   help="run the set this many times, one report row each (the first: cold, after start-up)")
    p.add_argument("--num-requests", type=int, default=16)
    p.add_argument("--enable-warmup", action="store_true", help="run warm-up requests first (not counted)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up batches/requests with --enable-warmup")
    p.add_argument("--nfe", type=int, default=16)
    p.add_argument("--cfg", type=float, default=DEFAULT_SAMPLING.cfg_strength)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="", help="name of this configuration in the report")
    p.add_argument("--output-json", help="append results as JSON lines")
    p.add_argument("--plot", help="PNG of the sweep (batch sizes or concurrencies)")
    p.add_argument("--chunking-work", action="store_true",
                   help="no model, no GPU: each set's DiT work whole (as f5_tts cuts texts) against streamed (as "
                        "f5_tts_streaming does), from the package's preprocessing, and the bound that puts on streamed "
                        "against whole-response throughput; then exit (default --set: every built-in set)")
    off = p.add_argument_group("offline")
    add_model_args(off)
    off.add_argument("--batch-size", default="1", help="batch size, or a comma list for a sweep")
    off.add_argument("--server-warmup", action="store_true",
                     help="first run a server's warm-up (compiles, every CUDA graph up to the largest batch size, or "
                          "--max-streams with --streaming, and the frame limit) and report how long it took: the first "
                          "pass is then what a ready server does")
    bench.add_engine_args(p)
    srv = p.add_argument_group("server")
    srv.add_argument("--server-url", help="host:port; None: localhost:$GRPC_PORT (8001), or $HTTP_PORT (8000) with --protocol http")
    srv.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    srv.add_argument("--concurrency", help="concurrent clients, or a comma list for a sweep (closed loop; default 1)")
    srv.add_argument("--request-rate",
                     help="open loop instead of --concurrency: requests per second arriving as a Poisson process "
                          "(exponential gaps drawn from --seed), each sent at its time on a connection of its own "
                          "whatever the server is doing; a comma list sweeps; inf: every request at once")
    srv.add_argument("--max-concurrency", type=int,
                     help="--request-rate: requests in flight at most (a later arrival waits for one to end); "
                          "default: no cap")
    srv.add_argument("--first-audio-budget", type=float, default=bench.DEFAULT_FIRST_AUDIO_BUDGET_S,
                     help="--request-rate: seconds to first audio that count as good (goodput, capacity); without "
                          "--streaming the first audio is the whole response")
    srv.add_argument("--metrics-url",
                     help="--request-rate: Triton's Prometheus endpoint, read before and after each rate for the "
                          "queue and refusal columns (empty when it cannot be read); default: the --server-url "
                          "host, port $METRICS_PORT (8002)")
    srv.add_argument("--model-name", help="default f5_tts, or f5_tts_streaming with --streaming")
    stream = p.add_argument_group("streaming")
    stream.add_argument("--streaming", action="store_true",
                        help="stream each request (server: f5_tts_streaming; offline: the stream scheduler in "
                             "process, at --concurrency)")
    stream.add_argument("--granularity", choices=["cohort", "chunk"], default=DEFAULT_SCHEDULER.granularity, help="offline --streaming")
    stream.add_argument("--max-streams", type=int, default=32, help="offline --streaming: streams batched at once")
    stream.add_argument("--profile", nargs="?", const="", metavar="DIR",
                        help="offline --streaming: torch.profiler over each row of the last pass (every thread's host "
                             "ops and the GPU's kernels; it slows the host down): where the GPU idled, printed and "
                             "kept in the row's extra.gpu_idle; with DIR also a Chrome trace per row there (large)")
    args = p.parse_args(argv)
    args.set = args.set or (",".join(bench.BUILTIN_SETS) if args.chunking_work
                            else "paragraphs" if args.streaming else "uniform")
    unknown = set(args.set.split(",")) - set(bench.BUILTIN_SETS)
    if unknown:
        p.error(f"--set: unknown set(s) {sorted(unknown)}; known: {', '.join(bench.BUILTIN_SETS)}")
    if args.profile is not None and not (args.streaming and args.mode == "offline"):
        p.error("--profile: only with --mode offline --streaming (a server's GPU work is in another process)")
    args.server_url = args.server_url or default_url(args.protocol)
    if args.request_rate is not None:
        if args.mode != "server":
            p.error("--request-rate: only with --mode server (open-loop arrivals at a running Triton)")
        if args.concurrency is not None:
            p.error("--request-rate and --concurrency: give one (open loop or closed loop); --max-concurrency caps "
                    "the requests in flight of an open loop")
        try:
            args.request_rate = bench.parse_rates(args.request_rate)
        except ValueError as exc:
            p.error(str(exc))
        if args.max_concurrency is not None and args.max_concurrency < 1:
            p.error(f"--max-concurrency: must be >= 1, got {args.max_concurrency}")
        if not args.first_audio_budget > 0:
            p.error(f"--first-audio-budget: must be > 0 seconds, got {args.first_audio_budget}")
        args.metrics_url = args.metrics_url or default_metrics_url(args.server_url.rsplit(":", 1)[0])
    args.concurrency = args.concurrency or "1"
    if args.model_name is None:
        args.model_name = STREAMING_MODEL if args.streaming else MODEL
    return args


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x]


def load_items(args, set_name: str) -> list[bench.Item]:
    if not args.dataset:
        return bench.builtin_set(set_name, args.num_requests, args.reference_audio)
    items = bench.load_items(args.dataset)
    return [items[i % len(items)] for i in range(args.num_requests)]


def run_offline(args, items, batch_size: int, tts, label: str) -> bench.Result:
    import torch

    from f5_triton.request import validate_request

    def one_batch(batch_items, timer):
        with timer("preprocess"):  # validation is part of what a request costs
            requests = [validate_request(it.wave, it.reference_text, it.target_text, sample_rate=it.sample_rate,
                                         nfe_steps=args.nfe, cfg_strength=args.cfg, seed=args.seed + i)
                        for i, it in enumerate(batch_items)]
        return tts.synthesize(requests, stage=timer)

    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    if args.enable_warmup:
        for batch in batches[: args.warmup]:
            one_batch(batch, bench.StageTimer(args.device))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    timer = bench.StageTimer(args.device)
    result = bench.Result(mode="offline", label=label, requests=len(items), batch_size=batch_size)
    start = time.perf_counter()
    for batch in tqdm(batches, desc=f"offline bs={batch_size}", unit="batch"):
        t0 = time.perf_counter()
        outs = one_batch(batch, timer)
        elapsed = time.perf_counter() - t0
        result.latencies += [elapsed] * len(batch)
        result.audio_seconds += sum(len(o) for o in outs) / SAMPLE_RATE
    result.wall_seconds = time.perf_counter() - start
    result.stage_seconds = {k: round(v, 4) for k, v in timer.seconds.items()}
    if args.device.startswith("cuda"):
        result.gpu_peak_mib = torch.cuda.max_memory_allocated() / 2**20
    return result


def triton_compute_seconds(stats: dict) -> dict[str, float]:
    """Seconds each model spent computing (protobuf-to-JSON drops zero counters, hence the defaults)."""
    return {m["name"]: int(m.get("inference_stats", {}).get("compute_infer", {}).get("ns", 0)) / 1e9
            for m in stats.get("model_stats", [])}


def run_server(args, items, concurrency: int, label: str) -> bench.Result:
    import concurrent.futures
    import threading

    from f5_triton.client import protocol_module, synthesize

    module = protocol_module(args.protocol)
    local = threading.local()

    def client():
        if not hasattr(local, "client"):
            local.client = module.InferenceServerClient(args.server_url)
        return local.client

    def send(i_item):  # no seed: the server's output cache would replay seeded repeats (the warm-up, other passes)
        _, item = i_item
        t0 = time.perf_counter()
        audio = synthesize(args.server_url, item.wave, item.reference_text, item.target_text,
                           protocol=args.protocol, model=args.model_name, client=client(),
                           sample_rate=item.sample_rate, nfe_steps=args.nfe, cfg_strength=args.cfg)
        return time.perf_counter() - t0, len(audio) / SAMPLE_RATE

    def stats():
        with module.InferenceServerClient(args.server_url) as c:
            s = c.get_inference_statistics() if args.protocol == "http" else c.get_inference_statistics(as_json=True)
            return triton_compute_seconds(s)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        if args.enable_warmup:
            list(pool.map(send, enumerate(items[: max(args.warmup, concurrency)])))
        before = stats()
        result = bench.Result(mode="server", label=label, requests=len(items), concurrency=concurrency)
        with bench.GpuSampler() as gpus:
            start = time.perf_counter()
            for latency, seconds in tqdm(pool.map(send, enumerate(items)), total=len(items),
                                         desc=f"server c={concurrency}", unit="req"):
                result.latencies.append(latency)
                result.audio_seconds += seconds
            result.wall_seconds = time.perf_counter() - start
        after = stats()
    result.stage_seconds = {k: round(after[k] - before.get(k, 0.0), 4) for k in after
                            if k != args.model_name and after[k] - before.get(k, 0.0) > 0}
    result.gpu_utilization = gpus.mean_utilization()
    return result


def _pass_labels(args, label: str, set_name: str) -> list[str]:
    """One report label per pass over a set: the set's name is in it, and the pass when there are several."""
    label = f"{label} {'dataset' if args.dataset else set_name}"
    return [label] if args.passes == 1 else [f"{label} pass{p}" for p in range(1, args.passes + 1)]


def server_warm_up(args, tts, max_requests: int) -> float:
    """What a server does before it reports ready (`serving.factories.warm_up`) for batches of up to `max_requests`
    requests (its max batch size, or its streaming model's max streams); returns its seconds."""
    from f5_triton.config import DEFAULT_LIMITS

    start = time.perf_counter()
    tts.flow_matching.warm_up(max_requests, nfe_steps=args.nfe, max_frames=DEFAULT_LIMITS.max_mel_frames,
                              log=lambda message: print(f"server warm-up: {message}", flush=True))
    return time.perf_counter() - start


class Results(list):
    """The report's rows; each is appended to --output-json as soon as it is measured (a run cut short by a time
    limit keeps what it measured)."""

    def __init__(self, output_json: str | None):
        super().__init__()
        self.output_json = output_json

    def append(self, result: bench.Result) -> None:
        super().append(result)
        table = bench.format_open_loop_table if "request_rate" in result.extra else bench.format_table
        print(table([result]).splitlines()[-1], flush=True)
        if self.output_json:
            with open(self.output_json, "a") as f:
                f.write(json.dumps(result.summary()) + "\n")


def run_streaming(args, items, concurrency: int, label: str, open_stream, profile: bool = False,
                  trace: Path | None = None) -> bench.Result:
    """`concurrency` clients streaming `items`; `open_stream(i, item)` -> iterator of waveform pieces; `profile`,
    `trace`: `bench.gpu_idle_profile`'s."""
    import concurrent.futures

    def send(i_item):
        return bench.time_stream(open_stream(*i_item))

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        if args.enable_warmup:
            list(pool.map(send, enumerate(items[: max(args.warmup, concurrency)])))
        result = bench.Result(mode=f"{args.mode} streaming", label=label, requests=len(items), concurrency=concurrency)
        with bench.GpuSampler() as gpus, bench.gpu_idle_profile(profile, trace) as idle:
            start = time.perf_counter()
            timings = list(tqdm(pool.map(send, enumerate(items)), total=len(items), desc=f"streaming c={concurrency}",
                                unit="req"))
            result.wall_seconds = time.perf_counter() - start
    bench.add_stream_timings(result, timings, opening=concurrency)
    if profile:
        result.extra["gpu_idle"] = idle
        print(bench.format_idle_summary(idle), flush=True)
    result.gpu_utilization = gpus.mean_utilization()
    return result


def stream_opener(args, retries: int = 1):
    """(open_stream for run_streaming, the scheduler to close or None): Triton's gRPC stream or in process.
    `retries`: a server's retriable refusals retried (`client.stream_synthesize`)."""
    if args.mode == "server":
        import tritonclient.grpc  # noqa: F401  # imported here, not in the first timed request (~0.2-0.3 s)

        from f5_triton.client import stream_synthesize

        def open_server(i, item):  # no seed: the server's output cache replays seeded repeats (a warm pass)
            return stream_synthesize(args.server_url, item.wave, item.reference_text, item.target_text,
                                     model=args.model_name, timeout=600, retries=retries,
                                     sample_rate=item.sample_rate, nfe_steps=args.nfe, cfg_strength=args.cfg)

        return open_server, None
    from f5_triton.config import SamplingConfig
    from f5_triton.request import validate_request
    from f5_triton.stream_scheduler import StreamScheduler
    from f5_triton.streaming import StreamingSynthesizer
    from f5_triton.text import StreamingChunker

    tts, _ = bench.tts_from_args(args)
    seconds = server_warm_up(args, tts, args.max_streams) if args.server_warmup else 0.0
    scheduler = StreamScheduler(StreamingSynthesizer(tts.stages(StreamingChunker())),
                                granularity=args.granularity, max_streams=args.max_streams).start()
    if args.server_warmup:  # as f5_tts_streaming: a stream through every stage once
        seconds += scheduler.warm_up(SamplingConfig(nfe_steps=args.nfe, cfg_strength=args.cfg))
        print(f"server warm-up: ready after {seconds:.1f} s", flush=True)

    def open_in_process(i, item):
        request = validate_request(item.wave, item.reference_text, item.target_text, sample_rate=item.sample_rate,
                                   nfe_steps=args.nfe, cfg_strength=args.cfg, seed=args.seed + i)
        return (piece.audio for piece in scheduler.stream(request))

    return open_in_process, scheduler


def main_streaming(args, sets: list[str], results: list) -> str:
    """Streaming sweeps, one per pass over each set (the first pass right after start-up: cold); returns the label."""
    open_stream, scheduler = stream_opener(args)
    label = args.label or (f"{args.protocol} nfe{args.nfe}" if args.mode == "server"
                           else f"{args.granularity} nfe{args.nfe}")
    try:
        for set_name in sets:
            items = load_items(args, set_name)
            names = _pass_labels(args, label, set_name)
            for name in names:
                for concurrency in _ints(args.concurrency):
                    profile = args.profile is not None and name == names[-1]
                    trace = (Path(args.profile) / f"{name.replace(' ', '-')}-c{concurrency}.json"
                             if profile and args.profile else None)
                    results.append(run_streaming(args, items, concurrency, name, open_stream, profile, trace))
    finally:
        if scheduler is not None:
            scheduler.close()
    print(bench.format_streaming_table(results))
    return label


def response_opener(args):
    """open_stream for an open loop of whole responses (f5_tts): one piece, the waveform, on a connection of the
    request's own; no retry (a refusal is counted), no seed (the output cache would replay a warm pass) and, as
    `run_server`, no client timeout (`synthesize` passes it as gRPC's `client_timeout`, which tritonclient.http's
    `infer` does not take)."""
    from f5_triton.client import protocol_module, synthesize

    protocol_module(args.protocol)  # imported here, not in the first timed request

    def open_server(i, item):
        yield synthesize(args.server_url, item.wave, item.reference_text, item.target_text, protocol=args.protocol,
                         model=args.model_name, retries=0, sample_rate=item.sample_rate,
                         nfe_steps=args.nfe, cfg_strength=args.cfg)

    return open_server


def run_rate(args, items, rate: float, label: str, open_stream) -> bench.Result:
    """`items` sent at Poisson arrival times of `rate` per second (`bench.run_open_loop`), each timed as
    `run_streaming`'s are, with the server's queue metrics read before and after."""
    from f5_triton.client import is_refused

    mode = "server streaming open-loop" if args.streaming else "server open-loop"
    result = bench.Result(mode=mode, label=label, requests=len(items))
    before = bench.read_metrics(args.metrics_url)
    arrivals = bench.poisson_arrivals(len(items), rate, args.seed)
    with bench.GpuSampler() as gpus:
        outcomes, wall = bench.run_open_loop(lambda i: bench.time_stream(open_stream(i, items[i])), len(items),
                                             arrivals, args.max_concurrency, refused=is_refused)
    bench.add_open_loop_outcomes(result, outcomes, rate, wall, args.first_audio_budget)
    result.extra.update(bench.queue_statistics(before, bench.read_metrics(args.metrics_url), args.model_name,
                                               args.streaming))
    result.gpu_utilization = gpus.mean_utilization()
    for failure in result.extra.get("failures", []):
        print(f"FAILED ({label}, rate {rate:g}): {failure}", file=sys.stderr, flush=True)
    return result


def main_open_loop(args, sets: list[str], results: list) -> str:
    """Open-loop sweeps over --request-rate, one per pass over each set; then the table and each label's capacity."""
    open_stream = stream_opener(args, retries=0)[0] if args.streaming else response_opener(args)
    label = args.label or f"{args.protocol} nfe{args.nfe}"
    for set_name in sets:
        items = load_items(args, set_name)
        if args.enable_warmup:  # once per set, one request at a time
            for i, item in enumerate(items[: args.warmup]):
                bench.time_stream(open_stream(i, item))
        for name in _pass_labels(args, label, set_name):
            for rate in args.request_rate:
                results.append(run_rate(args, items, rate, name, open_stream))
    print(bench.format_open_loop_table(results))
    print(f"first-audio budget {1000 * args.first_audio_budget:.0f} ms"
          + ("" if args.streaming else " (whole responses: the first audio is the whole response)")
          + "; goodput: the share of requests sent that started within it and never stalled")
    rows = [r.summary() for r in results]
    for name, rate in bench.capacity(rows).items():
        print(f"capacity {name}: " + (f"{rate:g} requests/s" if rate is not None else
                                      "none (the lowest rate swept did not hold)")
              + " (the highest offered rate up to which every rate swept had all its requests answered, none "
                "stalled, and first-audio p90 within the budget)")
    failed = sum(r.extra["failed"] for r in results)
    if failed:
        print(f"FAILED: {failed} request(s) failed (not refused); see the FAILED lines above", file=sys.stderr)
    return label


def main_chunking_work(args, sets: list[str]) -> None:
    """--chunking-work: the table of `bench.chunking_work` per set."""
    rows = [(name, *bench.chunking_work(load_items(args, name), args.nfe, args.cfg, vocab=args.vocab))
            for name in sets]
    print(bench.format_chunking_table(rows))
    print("bound: whole / streamed work x streamed / whole audio, by the linear term (tokens x steps), the attention "
          "term (rows x length^2 x steps) and both as F5TTS_v1_Base's FLOPs: the most streamed throughput can reach "
          "against whole responses' when the chunks alone differ (same batching, same kernels)")


def main(argv=None) -> int:
    args = parse_args(argv)
    sets = ["dataset"] if args.dataset else args.set.split(",")
    if args.chunking_work:
        main_chunking_work(args, sets)
        return 0
    results = Results(args.output_json)
    if args.request_rate is not None:
        label = main_open_loop(args, sets, results)
        if args.plot:
            print(f"plot: {bench.plot_open_loop([r.summary() for r in results], args.plot, title=label)}")
        return 1 if any(r.extra["failed"] for r in results) else 0
    if args.streaming:
        label = main_streaming(args, sets, results)
    elif args.mode == "offline":
        tts, dtype_name = bench.tts_from_args(args)
        args.device = str(tts.flow_matching.device)
        label = args.label or f"{args.dit_engine} {dtype_name} nfe{args.nfe}"
        if args.server_warmup:
            print(f"server warm-up: ready after {server_warm_up(args, tts, max(_ints(args.batch_size))):.1f} s",
                  flush=True)
        for set_name in sets:
            items = load_items(args, set_name)
            for batch_size in _ints(args.batch_size):
                for name in _pass_labels(args, label, set_name):
                    results.append(run_offline(args, items, batch_size, tts, name))
    else:
        label = args.label or f"{args.protocol} nfe{args.nfe}"
        for set_name in sets:
            items = load_items(args, set_name)
            for concurrency in _ints(args.concurrency):
                for name in _pass_labels(args, label, set_name):
                    results.append(run_server(args, items, concurrency, name))
    if not args.streaming:
        print(bench.format_table(results))
    if args.plot:
        print(f"plot: {bench.plot_sweep(results, args.plot, title=label)}")
    bad = [r for r in results if not np.isfinite(r.rtf)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
