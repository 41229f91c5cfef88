"""benchmark.py produces its numbers (on CPU with a tiny model; their size is not checked here)."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_offline_mode_reports_json_table_and_plot(tmp_path, tiny_ckpt):
    out_json, plot = tmp_path / "offline.jsonl", tmp_path / "offline.png"
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmark.py"), "--mode", "offline", "--ckpt-dir", str(tiny_ckpt),
         "--batch-size", "1,2", "--num-requests", "2", "--nfe", "2", "--enable-warmup", "--warmup", "1",
         "--set", "mixed", "--passes", "2",
         "--device", "cpu", "--output-json", str(out_json), "--plot", str(plot)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [(r["batch_size"], r["label"].split()[-2:]) for r in rows] == [
        (1, ["mixed", "pass1"]), (1, ["mixed", "pass2"]), (2, ["mixed", "pass1"]), (2, ["mixed", "pass2"])]
    for row in rows:
        assert row["rtf"] > 0 and row["throughput_audio_s_per_s"] > 0 and row["audio_seconds"] > 0
        assert row["latency_p50_s"] <= row["latency_p99_s"]
        assert set(row["stage_seconds"]) == {"preprocess", "dit", "vocoder", "postprocess"}
    assert "RTF" in result.stdout and plot.stat().st_size > 1000


def test_dataset_loading(tmp_path, ref_en):
    import shutil

    shutil.copy(ref_en, tmp_path / "a.wav")
    (tmp_path / "a.txt").write_text("Some call me nature.")
    (tmp_path / "a.target.txt").write_text("Hello world.")
    items = bench.load_items(tmp_path)
    assert len(items) == 1 and items[0].target_text == "Hello world." and items[0].sample_rate == 24000
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text(json.dumps({"ref_audio": "a.wav", "ref_text": "x y", "target_text": "z"}) + "\n")
    assert bench.load_items(jsonl)[0].reference_text == "x y"
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no benchmark items"):
        bench.load_items(tmp_path / "empty.jsonl")


def test_builtin_items_ask_for_about_twice_the_reference():
    items = bench.builtin_items(3)
    assert len(items) == 3
    ratio = len(items[0].target_text.encode()) / len(items[0].reference_text.encode())
    assert 1.6 < ratio < 2.2
    assert np.abs(items[0].wave).max() > 0.01


def test_gpu_idle_summary_charges_each_gap_to_the_host_work_in_progress():
    spans = [  # (kind, name, start us, end us), as bench.profiler_spans reads a torch.profiler run
        ("gpu", "gemm", 0, 100), ("gpu", "attention", 50, 150),  # overlapping: busy 0..150
        ("gpu", "Memcpy DtoH", 400, 500),  # a 250 us gap before it, middle 275
        ("gpu", "gemm", 510, 600),  # 10 us: below min_gap_ms, busy but not a gap
        ("label", "stream_scheduler.deliver", 120, 420),
        ("label", "stream_scheduler.vocode", 130, 180),  # ends before the gap's middle
        ("label", "other thread", 260, 660),  # contains it but is longer
        ("op", "aten::copy_", 200, 350), ("op", "cudaStreamSynchronize", 260, 290),
        ("op", "aten::add", 10, 30),
    ]
    summary = bench.gpu_idle_summary(spans, min_gap_ms=0.05)
    assert summary["span_ms"] == 0.6 and summary["busy_ms"] == 0.34 and summary["busy_share"] == round(0.34 / 0.6, 4)
    assert summary["gaps"] == 1
    assert summary["idle_by_label"] == {"stream_scheduler.deliver": 0.25}
    assert summary["idle_by_op"] == {"cudaStreamSynchronize": 0.25}
    assert "GPU busy 56.7 %" in bench.format_idle_summary(summary)
    assert bench.gpu_idle_summary([])["busy_share"] is None


def test_gpu_idle_profile_sees_every_thread():
    import threading

    import torch
    from torch.profiler import record_function

    def in_another_thread():
        def work():
            with record_function("worker label"):
                torch.randn(64, 64) @ torch.randn(64, 64)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()

    with bench.all_threads_profile() as prof:
        in_another_thread()
    spans = {(kind, name) for kind, name, _, _ in bench.profiler_spans(prof)}
    assert ("label", "worker label") in spans and ("op", "aten::mm") in spans
    with bench.gpu_idle_profile(True) as report:
        in_another_thread()
    assert report["busy_share"] is None and report["gaps"] == 0  # this machine has no GPU spans to count


def test_result_statistics():
    r = bench.Result(mode="offline", label="x", requests=4, batch_size=2, wall_seconds=2.0, audio_seconds=8.0,
                     latencies=[1.0, 2.0, 3.0, 4.0])
    assert r.rtf == 0.25 and r.throughput == 4.0
    assert r.percentile(50) == 2.5
    assert "0.2500" in bench.format_table([r])


def test_first_audio_of_the_opening_burst_and_of_later_requests_apart():
    def timing(first):
        return bench.StreamTiming(first_audio=first, total=first + 1.0, audio_seconds=5.0, stall=0.0)

    result = bench.Result(mode="server streaming", label="x", requests=6, concurrency=2)
    bench.add_stream_timings(result, [timing(t) for t in (0.5, 0.3, 0.1, 0.2, 0.1, 0.1)], opening=2)
    assert result.extra["first_audio_opening_p50_s"] == pytest.approx(0.4)
    assert result.extra["first_audio_opening_p90_s"] == pytest.approx(0.48)
    assert result.extra["first_audio_later_p90_s"] == pytest.approx(0.17)
    assert result.extra["first_audio_p50_s"] == pytest.approx(0.15)
    assert result.audio_seconds == 30.0 and result.percentile(50) == pytest.approx(1.15)
    table = bench.format_streaming_table([result]).splitlines()
    assert table[0].split()[11:14] == ["opening", "p90", "later"] and table[-1].split()[6:8] == ["480", "170"]
    alone = bench.Result(mode="server streaming", label="y", requests=2, concurrency=2)
    bench.add_stream_timings(alone, [timing(0.5), timing(0.3)], opening=2)  # every request opened the run
    assert "first_audio_later_p90_s" not in alone.extra and bench.format_streaming_table([alone]).split()[-8] == "-"


def test_playback_stalls_count_the_waits_after_playback_started():
    # pieces of 1 s arriving at 0.1 s, 0.5 s (in time), 2.6 s (0.5 s late: the first two play out at 2.1 s) and
    # 3.0 s (in time: the third plays until 3.6 s)
    assert bench.playback_stall([0.1, 0.5, 2.6, 3.0], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.5)
    assert bench.playback_stall([0.2, 0.3], [0.05, 1.0]) == pytest.approx(0.05)
    assert bench.playback_stall([0.2], [1.0]) == bench.playback_stall([], []) == 0.0
    stalled = [bench.StreamTiming(0.1, 3.0, 4.0, stall) for stall in (0.0, 0.0, 0.0, 0.5)]
    result = bench.Result(mode="server streaming", label="x", requests=4, concurrency=1)
    bench.add_stream_timings(result, stalled)
    assert result.extra["stalled_share"] == 0.25 and result.extra["stall_p90_s"] == pytest.approx(0.35)
    assert "25 %" in bench.format_streaming_table([result])


def test_time_stream_times_pieces_as_they_come():
    def pieces():
        yield np.zeros(0, dtype=np.float32)  # an empty piece (the cross-fade held everything back) is no audio
        time.sleep(0.05)
        yield np.zeros(2400, dtype=np.float32)  # 0.1 s of audio
        time.sleep(0.3)  # the 0.1 s has played out 0.2 s before the next piece
        yield np.zeros(24000, dtype=np.float32)

    timing = bench.time_stream(pieces())
    assert 0.05 <= timing.first_audio < 0.3 <= timing.total and timing.audio_seconds == pytest.approx(1.1)
    assert 0.15 <= timing.stall < 0.5


def test_plot_results_charts_rows_of_several_runs(tmp_path):
    row = {"mode": "server", "label": "gpus=0", "concurrency": 64, "throughput_audio_s_per_s": 136.6,
           "latency_p50_s": 4.19, "gpu_utilization": {"gpu0": 94.0, "gpu1": 0.0}}
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text(json.dumps(row) + "\n\n")
    two.write_text(json.dumps({**row, "label": "gpus=0,1", "throughput_audio_s_per_s": 264.5}) + "\n")
    out = tmp_path / "runs.png"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "plot_results.py"), str(one),
                           f"{two}: capped", "--output", str(out)], capture_output=True, text=True, check=True)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "plot:" in done.stdout
    with pytest.raises(FileNotFoundError, match="missing"):
        bench.plot_runs([row], tmp_path / "missing" / "x.png")


def test_mixed_set_is_deterministic_and_spread_like_real_traffic():
    from f5_triton import audio, text

    items = bench.mixed_items(64)
    again = bench.builtin_set("mixed", 8)
    assert [(a.reference_text, a.target_text) for a in items[:8]] == [(b.reference_text, b.target_text) for b in again]
    assert all(np.array_equal(a.wave, b.wave) for a, b in zip(items[:8], again))
    ref_seconds = np.array([len(it.wave) / it.sample_rate for it in items])
    ref_frames = [audio.reference_frames(len(it.wave)) for it in items]
    # the pipeline's own duration estimate decides how much speech each request asks for
    target_seconds = np.array([
        (audio.estimate_duration(n, text.fix_reference_text(it.reference_text), it.target_text, 1.0) - n) * 256 / 24000
        for n, it in zip(ref_frames, items)])
    assert ref_seconds.min() >= 3.0 and ref_seconds.max() <= 10.0
    assert target_seconds.min() >= 1.5 and target_seconds.max() <= 21.0
    # spread over the ranges, not bunched: every third of each range is drawn from
    for values, (low, high) in ((ref_seconds, bench.MIXED_REFERENCE_SECONDS), (target_seconds, bench.MIXED_TARGET_SECONDS)):
        thirds = np.histogram(values, bins=3, range=(low, high))[0]
        assert thirds.min() >= 10, thirds
    # one sentence each: the pipeline keeps every target as a single job of the intended length
    assert all(len(text.chunk_text(it.target_text, text.max_chunk_bytes(it.reference_text, seconds, 1.0))) == 1
               for it, seconds in zip(items, ref_seconds))
    with pytest.raises(ValueError, match="unknown built-in set 'nope'"):
        bench.builtin_set("nope", 1)


def test_cold_pass_script_times_each_stage_of_both_passes(tiny_ckpt):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "cold_pass.py"), "--ckpt-dir", str(tiny_ckpt), "--device", "cpu",
         "--requests", "2", "--nfe", "2", "--warmup-requests", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert sum(line.startswith("pass 1 request") for line in lines) == 2
    assert sum(line.startswith("pass 2 request") for line in lines) == 2
    summary = [line for line in lines if line.startswith("pass 2: RTF")]
    assert summary and all(f"{stage} " in summary[0] for stage in ("total", "embed", "solve", "vocoder"))


# ---------------------------------------------------------------- open loop (--request-rate)

def test_poisson_arrivals_are_seeded_with_the_mean_rate_and_exponential_gaps():
    arrivals = bench.poisson_arrivals(20_001, 5.0, seed=1)
    assert np.array_equal(arrivals, bench.poisson_arrivals(20_001, 5.0, seed=1))
    assert not np.allclose(arrivals[1:100], bench.poisson_arrivals(20_001, 5.0, seed=2)[1:100])
    gaps = np.diff(arrivals)
    assert arrivals[0] == 0.0 and len(gaps) == 20_000 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)  # 5 requests per second
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # an exponential's coefficient of variation
    stats = pytest.importorskip("scipy.stats")
    assert stats.kstest(gaps, "expon", args=(0, 0.2)).pvalue > 0.01
    assert stats.kstest(gaps, "uniform", args=(0, 0.4)).pvalue < 1e-6  # the test tells other shapes apart
    assert (bench.poisson_arrivals(4, float("inf")) == 0).all() and len(bench.poisson_arrivals(1, 2.0)) == 1
    assert bench.parse_rates("2, 4,inf") == [2.0, 4.0, float("inf")]
    for bad, message in (("0", "must be > 0"), ("-1", "must be > 0"), ("nan", "must be > 0"), ("fast", "not a number"),
                         (",", "at least one")):
        with pytest.raises(ValueError, match=f"--request-rate: .*{message}"):
            bench.parse_rates(bad)


def test_open_loop_sends_at_the_arrival_times_whatever_the_earlier_requests_do():
    from tritonclient.utils import InferenceServerException

    def send(i):  # each answer takes longer than all the arrivals
        time.sleep(0.5)
        if i == 1:
            raise InferenceServerException("server busy: 2 streams held", status=None)
        if i == 2:
            raise TimeoutError("no audio within 600 s")
        return bench.StreamTiming(first_audio=0.1, total=0.3, audio_seconds=1.0, stall=0.0)

    from f5_triton.client import is_refused

    arrivals = np.array([0.0, 0.05, 0.1, 0.15])
    outcomes, wall = bench.run_open_loop(send, 4, arrivals, refused=is_refused)
    sent = np.array([o.sent_at for o in outcomes])
    assert (sent >= arrivals).all() and sent.max() < 0.5, sent  # each at its time, none after an earlier answer
    assert 0.65 <= wall < 2.0
    assert [(o.timing is not None, o.refused, type(o.error).__name__) for o in outcomes] == [
        (True, False, "NoneType"), (False, True, "InferenceServerException"), (False, False, "TimeoutError"),
        (True, False, "NoneType")]
    result = bench.Result(mode="server streaming open-loop", label="x", requests=4)
    bench.add_open_loop_outcomes(result, outcomes, 20.0, wall, budget=0.35)
    e = result.extra
    assert (e["sent"], e["completed"], e["refused"], e["failed"]) == (4, 2, 1, 1) and e["goodput"] == 0.5
    assert e["failures"] == ["TimeoutError: no audio within 600 s"] and not bench.holds(result.summary())
    assert e["achieved_rate"] == pytest.approx(2 / wall) and e["sent_rate"] > 10
    capped, _ = bench.run_open_loop(send, 3, np.zeros(3), max_concurrency=1, refused=is_refused)
    assert np.diff([o.sent_at for o in capped]).min() >= 0.49  # one in flight at a time: each waited for the last


def test_refused_is_the_servers_busy_answer_not_a_failure():
    from tritonclient.utils import InferenceServerException as E

    from f5_triton.client import is_refused

    assert is_refused(E("Exceeds maximum queue size", status="StatusCode.UNAVAILABLE"))  # gRPC
    assert is_refused(E("Request timeout expired", status="503"))  # HTTP
    assert is_refused(E("server busy: 17 streams held, the limit is 16 generated at once and 0 waiting; retry later"))
    assert not is_refused(E("deadline exceeded: the request's timeout of 1 s passed", status="StatusCode.UNAVAILABLE"))
    assert not is_refused(E("Stub process 'flow_matching_0_0' is not healthy.", status="StatusCode.UNAVAILABLE"))
    assert not is_refused(E("internal error: RuntimeError: boom", status="StatusCode.INTERNAL"))
    assert not is_refused(TimeoutError("no audio"))


def test_queue_statistics_difference_the_servers_prometheus_metrics():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    queue = Histogram(bench.QUEUE_SECONDS, "queue", ["model"], buckets=(0.005, 0.02, 0.1, 0.5), registry=registry)
    rejected = Counter(bench.REJECTED_REQUESTS.removesuffix("_total"), "refused", ["model", "reason"],
                       registry=registry)
    queue.labels(model="f5_tts_streaming").observe(0.3)  # before the run: not counted
    queue.labels(model="other").observe(0.3)

    def exposition():
        return bench.parse_metrics(generate_latest(registry).decode())

    before = exposition()
    for seconds in (0.001, 0.004, 0.015, 0.05, 0.06, 0.4):
        queue.labels(model="f5_tts_streaming").observe(seconds)
    rejected.labels(model="f5_tts_streaming", reason="busy").inc(3)
    stats = bench.queue_statistics(before, exposition(), "f5_tts_streaming", streaming=True)
    # queued: above the first bound >= 10 ms (20 ms here): 0.05, 0.06, 0.4
    assert stats["queued"] == 3 and stats["queue_mean_s"] == pytest.approx(0.53 / 6)
    assert stats["queue_p90_s"] == pytest.approx(0.1 + 0.4 * (5.4 - 5) / 1)  # Prometheus' histogram_quantile
    assert stats["server_refused"] == {"busy": 3, "queue_timeout": 0}
    assert bench.queue_statistics(before, None, "f5_tts_streaming", streaming=True) == {}
    assert bench.queue_statistics(before, exposition(), "f5_tts", streaming=False) == {
        "server_refused": {"busy": 3, "queue_timeout": 0}}  # no Triton queue metrics in this exposition
    assert bench.read_metrics("http://127.0.0.1:9/metrics") is None  # nothing listens: empty columns, no failure


def test_capacity_is_the_highest_rate_up_to_which_every_rate_held():
    def row(label, rate, p90, stalled=0.0, refused=0, failed=0):
        return {"label": label, "extra": {"request_rate": rate, "first_audio_p90_s": p90, "refused": refused,
                                          "failed": failed, "stalled_share": stalled, "first_audio_budget_s": 0.35}}

    rows = [row("a", 2.0, 0.1), row("a", 4.0, 0.35), row("a", 8.0, 0.5), row("a", 16.0, 0.2), row("a", "inf", 0.1),
            row("b", 2.0, 0.1), row("b", 4.0, 0.1, stalled=0.1), row("b", 8.0, 0.1, refused=1),
            row("c", 2.0, 0.1, failed=1), row("d", "inf", 0.1), row("e", 4.0, 0.1), row("e", 2.0, 0.1, refused=2)]
    assert bench.capacity(rows) == {"a": 4.0, "b": 2.0, "c": None, "d": None, "e": None}


@pytest.mark.server
def test_benchmark_open_loop_through_triton(streaming_server, tmp_path, capsys):
    """--request-rate against the tiny server, streamed (two passes, a rate and a burst) and whole responses."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_main", REPO_ROOT / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    common = ["--mode", "server", "--server-url", streaming_server.urls.grpc, "--metrics-url",
              streaming_server.urls.metrics, "--num-requests", "3", "--nfe", "2", "--set", "paragraphs", "--label", "t"]
    stream_json, stream_png = tmp_path / "stream.jsonl", tmp_path / "stream.png"
    assert benchmark.main(common + ["--streaming", "--request-rate", "8,inf", "--passes", "2", "--output-json",
                                    str(stream_json), "--plot", str(stream_png)]) == 0
    out = capsys.readouterr().out
    whole_json = tmp_path / "whole.jsonl"
    assert benchmark.main(common + ["--request-rate", "inf", "--output-json", str(whole_json)]) == 0
    out += capsys.readouterr().out
    streamed = [json.loads(line) for line in stream_json.read_text().splitlines()]
    whole = [json.loads(line) for line in whole_json.read_text().splitlines()]
    assert [(r["label"], r["extra"]["request_rate"]) for r in streamed] == [
        ("t paragraphs pass1", 8.0), ("t paragraphs pass1", "inf"), ("t paragraphs pass2", 8.0),
        ("t paragraphs pass2", "inf")]
    assert [(r["mode"], r["extra"]["request_rate"]) for r in whole] == [("server open-loop", "inf")]
    for row in streamed + whole:
        e = row["extra"]
        assert e["sent"] == row["requests"] == 3 and e["completed"] + e["refused"] + e["failed"] == 3
        assert e["failed"] == 0 and e["completed"] >= 1
        assert 0 < e["first_audio_p50_s"] <= e["first_audio_p90_s"] <= e["first_audio_p99_s"]
        assert e["first_audio_p50_s"] <= row["latency_p50_s"] <= row["latency_p90_s"] <= row["latency_p99_s"]
        assert 0 <= e["stalled_share"] <= 1 and e["stall_p90_s"] >= 0 and 0 <= e["goodput"] <= 1
        assert e["first_audio_budget_s"] == 0.35 and 0 < e["achieved_rate"] and row["throughput_audio_s_per_s"] > 0
    for row in streamed:  # the server's f5_tts_queue_seconds, differenced over the row
        assert 0 <= row["extra"]["queued"] <= row["extra"]["completed"]
    assert whole[0]["extra"]["stalled_share"] == 0  # one piece: nothing to stall on
    assert whole[0]["extra"]["first_audio_p50_s"] == pytest.approx(whole[0]["latency_p50_s"], abs=0.01)
    assert whole[0]["extra"]["queue_mean_s"] >= 0  # Triton's own queue time of flow_matching
    assert stream_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "first-audio budget 350 ms" in out and "capacity t paragraphs pass2: " in out
    assert re.search(r"t paragraphs pass2\s+inf\s+[\d.]+\s+3\s+\d+\s+0\s+\d+", out), out
    # an error other than a refusal is a failure, said loudly: FAILED lines, the exit status
    assert benchmark.main(common + ["--request-rate", "inf", "--model-name", "no_such_model"]) == 1
    captured = capsys.readouterr()
    assert "FAILED (t paragraphs, rate inf): InferenceServerException" in captured.err and "no_such_model" in captured.err
    assert "FAILED: 3 request(s) failed (not refused)" in captured.err


def test_chunking_work_matches_a_hand_count_of_one_request():
    """One request chunked by hand with the duration rule (estimate_duration: ref + int(ref / ref bytes x chunk bytes))
    and its split for streaming (first chunk_bytes 50: the opening sentences up to 50 bytes)."""
    from f5_triton.config import ARCHITECTURES, CROSS_FADE_SECONDS

    t = np.arange(3 * 24000) / 24000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)  # no silence: clipping only appends 50 ms (1198)
    item = bench.Item(tone, 24000, "Some call me nature.",
                      "Hello there, my friend. This is a small test of the streaming chunker today.")
    whole, streamed = bench.chunking_work([item], nfe_steps=16, cfg_strength=2.0)
    ref = (72000 + 1198) // 256  # 285 frames; "Some call me nature.  " is 22 bytes as the model sees it
    # whole: one chunk of 76 bytes; streamed: "Hello there, my friend." (23) and the rest (52)
    lengths_whole = [ref + int(ref / 22 * 76)]  # 1269
    lengths_streamed = [ref + int(ref / 22 * 23), ref + int(ref / 22 * 52)]  # 582, 958
    assert (lengths_whole, lengths_streamed) == ([1269], [582, 958])
    for work, lengths in ((whole, lengths_whole), (streamed, lengths_streamed)):
        assert work.requests == 1 and work.chunks == len(lengths)
        assert work.tokens == sum(2 * n * 16 for n in lengths)  # two guidance rows, 16 steps
        assert work.attention == sum(2 * n * n * 16 for n in lengths)
        assert work.flops == pytest.approx(sum(16 * bench.dit_step_flops(ARCHITECTURES["F5TTS_v1_Base"], 2 * n, n)
                                               for n in lengths))
    fade = int(CROSS_FADE_SECONDS * 24000)
    assert whole.audio_seconds == pytest.approx((1269 - ref) * 256 / 24000)
    assert streamed.audio_seconds == pytest.approx(((582 - ref) + (958 - ref)) * 256 / 24000 - fade / 24000)
    # the reference is in each chunk's sequence: the stream does 1540 / 1269 of the whole request's linear work
    table = bench.format_chunking_table([("one", whole, streamed)])
    linear = 1269 / 1540 * streamed.audio_seconds / whole.audio_seconds
    assert f"{linear:.3f}" in table.splitlines()[-1] and "1 / 2" in table


def test_chunking_work_option_prints_every_set(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_main", REPO_ROOT / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.main(["--chunking-work", "--num-requests", "2"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[2:5]] == list(bench.BUILTIN_SETS), out
