"""Reliability and security of the Triton server: every bad request gets a clean error naming the
field and the limit, and the server keeps serving everyone else.

In process: the frame limit of a job, FlowMatcher dropping jobs between ODE steps, request-size
limits, the supervisor's flags. Against the real tritonserver (cpu target, tiny checkpoint): a table
of malformed requests over HTTP and gRPC, good and bad requests sharing a dynamic batch, request
cancellation and deadlines between ODE steps, NaN weights, an engine that fails to load, a
python-backend stub killed mid-run, and the custom metrics on /metrics.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import queue
import re
import shutil
import signal
import stat
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from f5_triton.config import DEFAULT_LIMITS, SAMPLE_RATE
from f5_triton.errors import InvalidInputError
from f5_triton.request import validate_request

REF_TEXT = "Some call me nature, others call me mother nature."
NFE = 2  # the server's default ODE steps: keeps the suite fast
INVALID = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
INTERNAL = {"http": "500", "grpc": "StatusCode.INTERNAL"}
UNAVAILABLE = {"http": "503", "grpc": "StatusCode.UNAVAILABLE"}


# -- request building -------------------------------------------------------------------------

def text(value: str | bytes) -> np.ndarray:
    return np.array([[value.encode("utf-8") if isinstance(value, str) else value]], dtype=object)


def i32(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int32)


def i64(value: int) -> np.ndarray:
    return np.array([[value]], dtype=np.int64)


def f32(value: float) -> np.ndarray:
    return np.array([[value]], dtype=np.float32)


def wav(samples: np.ndarray) -> dict[str, np.ndarray]:
    samples = np.asarray(samples)
    return {"reference_wav": samples[None], "reference_wav_len": i32(samples.shape[-1])}


def good_fields(wave: np.ndarray, target: str = "Reliable servers answer every request.",
                **changes) -> dict[str, np.ndarray | None]:
    """The arrays of one seeded `f5_tts` request (batch of one); a change to None leaves that input out."""
    fields = {**wav(wave.astype(np.float32)), "reference_text": text(REF_TEXT), "target_text": text(target),
              "seed": i64(7)}
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def client_module(protocol: str):
    import tritonclient.grpc
    import tritonclient.http

    return tritonclient.http if protocol == "http" else tritonclient.grpc


def url(server, protocol: str) -> str:
    return server.urls.http_hostport if protocol == "http" else server.urls.grpc


def infer_inputs(module, arrays: dict[str, np.ndarray]) -> list:
    from tritonclient.utils import np_to_triton_dtype

    inputs = []
    for name, array in arrays.items():
        tensor = module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def infer(server, arrays: dict[str, np.ndarray], protocol: str = "grpc", model: str = "f5_tts", **kwargs):
    """The InferResult of one request; raises tritonclient's InferenceServerException on errors."""
    module = client_module(protocol)
    with module.InferenceServerClient(url(server, protocol)) as client:
        return client.infer(model, infer_inputs(module, arrays), **kwargs)


def synthesize(server, arrays, protocol: str = "grpc", **kwargs) -> np.ndarray:
    return infer(server, arrays, protocol, **kwargs).as_numpy("waveform").reshape(-1)


def error_of(call) -> tuple[str, str]:
    """(status, message) of the error `call()` must raise."""
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as info:
        call()
    return str(info.value.status()), info.value.message()


def metrics(server, name: str) -> dict[frozenset, float]:
    """Samples of one metric from /metrics: {frozenset of (label, value): value}."""
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(server.urls.metrics, timeout=10) as r:
        body = r.read().decode()
    samples = {}
    for match in re.finditer(rf"^{re.escape(name)}(?:{{(.*?)}})? (\S+)$", body, flags=re.MULTILINE):
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        samples[labels] = float(match.group(2))
    return samples


def rejected(server, model: str) -> collections.Counter:
    counts = metrics(server, "f5_tts_rejected_requests_total")
    return collections.Counter({dict(k)["reason"]: v for k, v in counts.items() if dict(k)["model"] == model})


def flow_stats(server) -> tuple[int, int]:
    import tritonclient.http

    with tritonclient.http.InferenceServerClient(server.urls.http_hostport) as client:
        s = client.get_inference_statistics("flow_matching")["model_stats"][0]
        return int(s["inference_count"]), int(s["execution_count"])


# -- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_server):
    # queue delay: requests sent together share a dynamic batch of flow_matching. Short exit timeout:
    # after the stub-kill test the dead instance never finishes unloading (tritonserver 2.51). No output cache:
    # these tests send the same seeded request again to see the server compute it again.
    with tiny_server(nfe_steps=NFE, max_batch_size=4, preferred_batch_sizes=[4], queue_delay_us=200_000,
                     preprocess_instances=1, postprocess_instances=1, exit_timeout_secs=5,
                     output_cache_entries=0) as srv:
        yield srv


@pytest.fixture(scope="module")
def baseline(server, ref_wave) -> np.ndarray:
    """A good request's audio, made before anything else reaches the server."""
    return synthesize(server, good_fields(ref_wave))


@pytest.fixture(scope="module")
def preprocessor(tiny_tts):
    return tiny_tts.preprocess


# -- in process ---------------------------------------------------------------------------------------

def test_a_job_beyond_the_frame_limit_is_refused_not_truncated(preprocessor, ref_wave):
    # one long sentence (no . ! ? to split at) at the slowest speed: ~9000 frames
    request = validate_request(ref_wave, REF_TEXT, "word " * 60, speed=0.3, seed=1)
    with pytest.raises(InvalidInputError) as info:
        preprocessor(request)
    assert info.value.field == "target_text" and info.value.reason == "too_many_frames"
    assert f"the limit is {DEFAULT_LIMITS.max_mel_frames} frames" in str(info.value)
    # the same text in sentences is split into chunks that all fit
    chunks = preprocessor(validate_request(ref_wave, REF_TEXT, "Word word word word word. " * 12, seed=1)).jobs
    assert len(chunks) > 1 and max(j.total_frames for j in chunks) <= DEFAULT_LIMITS.max_mel_frames


def test_declined_jobs_are_dropped_between_steps_and_the_rest_is_unchanged(tiny_tts, ref_wave):
    jobs = [job for i, text_ in enumerate(["First request here.", "Second one, a bit longer than that.",
                                           "Third."])
            for job in tiny_tts.preprocess(validate_request(ref_wave, REF_TEXT, text_, seed=i, nfe_steps=4)).jobs]
    for index, job in enumerate(jobs):
        job.request_index = index
    alone = tiny_tts.flow_matching(jobs)
    steps = []
    got = tiny_tts.flow_matching(jobs, on_step=steps.append, keep=lambda job: not (job.request_index == 1 and steps))
    assert got[1] is None  # declined after the first step
    for index in (0, 2):
        torch.testing.assert_close(got[index], alone[index], atol=1e-5, rtol=0)
    assert len(steps) == 4

    steps.clear()
    got = tiny_tts.flow_matching(jobs, on_step=steps.append, keep=lambda job: len(steps) < 2)
    assert got == [None, None, None] and len(steps) == 2  # nobody left: the batch stopped at once


def test_request_size_limits_follow_the_request_limits():
    binary = DEFAULT_LIMITS.max_request_bytes("binary")
    longest = DEFAULT_LIMITS.max_reference_seconds * DEFAULT_LIMITS.max_sample_rate * 4
    assert longest < binary < longest + 2 * 2**20
    assert DEFAULT_LIMITS.max_request_bytes("json") > 5 * binary


def test_supervisor_passes_size_limits_where_the_binary_has_the_flags(tmp_path):
    from f5_triton.supervisor.install import TritonInstall
    from f5_triton.supervisor.server import TritonServer

    def command(help_text: str, **kwargs) -> list[str]:
        binary = tmp_path / f"tritonserver-{len(list(tmp_path.iterdir()))}"
        binary.write_text(f"#!/bin/sh\ncat <<'EOF'\n{help_text}\nEOF\n")
        binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
        return TritonServer(tmp_path, install=TritonInstall(binary=binary), **kwargs).command()

    new = command("Usage:\n  --http-max-input-size <integer>\n\tmaximum\n  --grpc-port <integer>\n")
    assert f"--http-max-input-size={DEFAULT_LIMITS.max_request_bytes('json')}" in new
    assert not any(a.startswith("--grpc-max-input-size") for a in new)
    old = command("Usage:\n  --grpc-port <integer>\n")  # tritonserver 2.51: no such flag
    assert not any("max-input-size" in a for a in old)
    assert "--model-control-mode=explicit" in old and "--load-model=*" in old  # stub recovery
    unrestricted = command("Usage:\n", restricted_apis=())
    assert "--model-control-mode=none" in unrestricted  # never explicit control without the admin key
    assert "--model-control-mode=none" in command("Usage:\n", recover_stubs=False)


# -- real server: malformed requests ------------------------------------------------------------------

def malformed_requests(wave: np.ndarray) -> list[tuple[str, dict, str, str | None]]:
    """(what, changes to a good request, message substring, metrics reason or None if Triton itself
    refuses the request before our validator sees it)."""
    second = SAMPLE_RATE
    long_wave = np.tile(wave, int(31 * second / len(wave)) + 1)[: 31 * second]
    nan_wave, inf_wave = wave.copy(), wave.copy()
    nan_wave[100], inf_wave[200] = np.nan, np.inf
    two = {k: np.concatenate([v, v]) for k, v in good_fields(wave).items()}
    return [
        ("empty target_text", {"target_text": text("")}, "target_text: is empty", "empty_text"),
        ("whitespace target_text", {"target_text": text(" \n\t ")}, "target_text: is empty", "empty_text"),
        ("target_text over the limit", {"target_text": text("a" * 2001)},
         "target_text: is 2001 bytes; the limit is 2000 bytes", "text_too_long"),
        ("target_text not UTF-8", {"target_text": text(b"\xff\xfe hello")}, "target_text: is not valid UTF-8",
         "bad_utf8"),
        ("target_text missing", {"target_text": None}, "target_text: is required", "missing"),
        ("empty reference_text", {"reference_text": text("")}, "reference_text: is empty", "empty_text"),
        ("reference_text not UTF-8", {"reference_text": text(b"caf\xe9")}, "reference_text: is not valid UTF-8",
         "bad_utf8"),
        ("reference_text over the limit", {"reference_text": text("b" * 2001)}, "reference_text: is 2001 bytes",
         "text_too_long"),
        ("reference_text missing", {"reference_text": None}, "reference_text: is required", "missing"),
        ("reference_wav missing", {"reference_wav": None, "reference_wav_len": None}, "reference_wav: is required",
         "missing"),
        ("empty reference_wav", wav(np.zeros(0, np.float32)), "reference_wav: is empty", "empty_audio"),
        ("reference_wav_len 0", {"reference_wav_len": i32(0)}, "reference_wav: is empty", "empty_audio"),
        ("reference under 0.3 s", wav(wave[: int(0.2 * second)]), "reference_wav: is 0.200 s; the minimum is 0.3 s",
         "audio_too_short"),
        ("reference over 30 s", wav(long_wave), "reference_wav: is 31.0 s; the maximum is 30.0 s", "audio_too_long"),
        ("NaN sample", wav(nan_wave), "reference_wav: contains NaN or Inf", "not_finite"),
        ("Inf sample", wav(inf_wave), "reference_wav: contains NaN or Inf", "not_finite"),
        ("silent reference", wav(np.zeros_like(wave)), "reference_wav: is silent", "silent_audio"),
        ("int16-scale samples", wav(wave * 32767), "reference_wav: peak", "out_of_range"),
        ("FP64 reference_wav", {"reference_wav": wave[None].astype(np.float64)},
         "input 'reference_wav' data-type is 'FP64', but model 'f5_tts' expects 'FP32'", None),
        ("stereo reference_wav", {"reference_wav": np.stack([wave, wave])[None]},
         "unexpected shape for input 'reference_wav'", None),
        ("reference_wav_len beyond the samples", {"reference_wav_len": i32(len(wave) + 1)},
         f"reference_wav_len: is {len(wave) + 1}; allowed range is [0, {len(wave)}], the samples reference_wav holds",
         "out_of_range"),
        ("negative reference_wav_len", {"reference_wav_len": i32(-5)},
         f"reference_wav_len: is -5; allowed range is [0, {len(wave)}], the samples reference_wav holds", "out_of_range"),
        ("sample_rate 4 kHz", {"sample_rate": i32(4000)},
         "sample_rate: sample rate 4000 Hz is outside the allowed range [8000, 48000] Hz", "out_of_range"),
        ("sample_rate 96 kHz", {"sample_rate": i32(96000)}, "sample_rate: sample rate 96000 Hz is outside the allowed",
         "out_of_range"),
        ("nfe_steps 0", {"nfe_steps": i32(0)}, "nfe_steps: is 0; allowed range is [1, 64]", "out_of_range"),
        ("nfe_steps 65", {"nfe_steps": i32(65)}, "nfe_steps: is 65; allowed range is [1, 64]", "out_of_range"),
        ("INT64 nfe_steps", {"nfe_steps": i64(8)}, "input 'nfe_steps' data-type is 'INT64'", None),
        ("negative cfg_strength", {"cfg_strength": f32(-1)}, "cfg_strength: is -1.0; allowed range is [0.0, 10.0]",
         "out_of_range"),
        ("NaN cfg_strength", {"cfg_strength": f32(np.nan)}, "cfg_strength: must be finite", "not_finite"),
        ("speed 0.1", {"speed": f32(0.1)}, "speed: is 0.1", "out_of_range"),
        ("speed 5", {"speed": f32(5)}, "speed: is 5.0; allowed range is [0.3, 3.0]", "out_of_range"),
        ("infinite speed", {"speed": f32(np.inf)}, "speed: must be finite", "not_finite"),
        ("negative seed", {"seed": i64(-1)}, "seed: is -1", "out_of_range"),
        ("two requests in one", two, "batch-size must be <= 1", None),
        ("a sentence beyond the frame limit", {"target_text": text("word " * 60), "speed": f32(0.3)},
         "target_text: text chunk 1 of 1", "too_many_frames"),
    ]


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_get_clean_errors_and_change_nothing(server, ref_wave, baseline, protocol):
    table = malformed_requests(ref_wave)
    assert len(table) >= 25
    before = rejected(server, "preprocess")
    problems = []
    for what, changes, expected, _ in table:
        status, message = error_of(lambda: infer(server, good_fields(ref_wave, **changes), protocol))
        if status != INVALID[protocol] or expected not in message:
            problems.append(f"{what}: got {status} {message!r}, expected {INVALID[protocol]} with {expected!r}")
    assert not problems, "\n".join(problems)
    # our validator counted each refusal under its reason (Triton's own refusals never reach it)
    counted = rejected(server, "preprocess") - before
    assert counted == collections.Counter(reason for *_, reason in table if reason is not None)
    # and the server is unchanged: the same good request gives the same audio
    np.testing.assert_array_equal(synthesize(server, good_fields(ref_wave), protocol), baseline)


# -- real server: a bad request in a batch fails alone ----------------------------------------------------

@pytest.mark.server
def test_bad_requests_in_a_batch_fail_alone(server, ref_wave):
    goods = [good_fields(ref_wave[: len(ref_wave) - 4000 * i], f"Good request number {i} is here.",
                         seed=i64(10 + i)) for i in range(4)]
    bads = [good_fields(ref_wave, target_text=text("")), good_fields(ref_wave, nfe_steps=i32(0)),
            good_fields(ref_wave, **wav(np.zeros_like(ref_wave))), good_fields(ref_wave, speed=f32(9))]
    alone = [synthesize(server, g) for g in goods]
    before = flow_stats(server)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good_futures = [pool.submit(synthesize, server, g) for g in goods]
        bad_futures = [pool.submit(error_of, lambda b=b: infer(server, b)) for b in bads]
        together = [f.result() for f in good_futures]
        errors = [f.result() for f in bad_futures]
    inferences, executions = (a - b for a, b in zip(flow_stats(server), before))
    assert inferences == len(goods) and executions < inferences  # the good ones shared a batch
    assert all(status == INVALID["grpc"] for status, _ in errors), errors
    for got, expected in zip(together, alone):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def flow_inputs(preprocessor, ref_wave, target: str, seed: int, nfe_steps: int = NFE, **changes):
    """The arrays of a direct `flow_matching` request for one synthesis request (batch of one)."""
    from f5_triton.serving import wire

    arrays = wire.pack_prepared(preprocessor(validate_request(ref_wave, REF_TEXT, target, seed=seed,
                                                              nfe_steps=nfe_steps)))
    arrays.pop("ref_rms")
    arrays.update(changes)
    return {k: v[None] for k, v in arrays.items()}


def flow_mels(result) -> list[np.ndarray]:
    from f5_triton.serving import wire

    return wire.unpack_mels(result.as_numpy("mel")[0], result.as_numpy("mel_frames")[0])


@pytest.mark.server
def test_bad_jobs_sent_to_flow_matching_fail_alone(server, preprocessor, ref_wave, tiny_ckpt):
    """flow_matching is a model of its own that clients can call: its inputs are checked per request."""
    goods = [flow_inputs(preprocessor, ref_wave, f"Direct request {i}.", seed=i) for i in range(3)]
    base = flow_inputs(preprocessor, ref_wave, "A bad one.", seed=9)
    nan_mel = base["ref_mel"][0].copy()
    nan_mel[3, 4] = np.nan
    vocab_size = sum(1 for _ in open(tiny_ckpt / "vocab.txt", encoding="utf-8"))
    bads = [
        ({**base, "durations": np.array([[DEFAULT_LIMITS.max_mel_frames + 10]], np.int32)}, "durations"),
        ({**base, "tokens": np.full_like(base["tokens"], vocab_size + 3)}, "tokens"),
        ({**base, "ref_mel": nan_mel[None]}, "ref_mel"),
        ({**base, "ref_frames": np.array([[0]], np.int32)}, "ref_frames"),
        ({**base, "nfe_steps": np.array([[0]], np.int32)}, "nfe_steps"),
        ({**base, "cfg_strength": np.array([[11.0]], np.float32)}, "cfg_strength"),
    ]
    alone = [flow_mels(infer(server, g, model="flow_matching")) for g in goods]
    before = flow_stats(server)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good_futures = [pool.submit(infer, server, g, model="flow_matching") for g in goods]
        bad_futures = [pool.submit(error_of, lambda b=b: infer(server, b, model="flow_matching")) for b, _ in bads]
        together = [flow_mels(f.result()) for f in good_futures]
        errors = [f.result() for f in bad_futures]
    inferences, executions = (a - b for a, b in zip(flow_stats(server), before))
    assert executions < len(goods) + len(bads)  # good and bad shared batches
    for (status, message), (_, field) in zip(errors, bads):
        assert status == INVALID["grpc"] and message.startswith(f"{field}:"), (status, message)
    for got, expected in zip(together, alone):
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)


@pytest.mark.server
def test_flow_matching_takes_its_sampling_typed(server, preprocessor, ref_wave):
    """preprocess hands flow_matching the ODE steps as INT32 (wire.JOB_FIELDS), which its jobs get as an int; a
    float sent for them is refused by Triton itself, naming the input."""
    from f5_triton.serving import wire

    arrays = flow_inputs(preprocessor, ref_wave, "Typed steps.", seed=3)
    assert {name: arrays[name].dtype for name in ("nfe_steps", "cfg_strength", "sway_sampling_coef")} == {
        "nfe_steps": np.int32, "cfg_strength": np.float32, "sway_sampling_coef": np.float32}
    job = wire.unpack_jobs({name: value[0] for name, value in arrays.items()})[0]
    assert type(job.nfe_steps) is int and job.nfe_steps == NFE and type(job.cfg_strength) is float
    assert flow_mels(infer(server, arrays, model="flow_matching"))
    status, message = error_of(lambda: infer(server, {**arrays, "nfe_steps": arrays["nfe_steps"].astype(np.float32)},
                                             model="flow_matching"))
    assert status == INVALID["grpc"] and "nfe_steps" in message and "FP32" in message, message


# -- real server: cancellation and deadlines ---------------------------------------------------------------

# One chunk (no sentence mark) of ~2500 frames: a few seconds of work at 16 ODE steps on one CPU thread.
LONG_TEXT = " ".join(["This sentence goes on for a while so that its generation takes a few seconds"] * 3)


@pytest.mark.server
def test_a_cancelled_request_is_dropped_between_steps_and_its_batch_goes_on(server, preprocessor, ref_wave):
    import tritonclient.grpc

    steps = 16
    long_job = flow_inputs(preprocessor, ref_wave, LONG_TEXT, seed=1, nfe_steps=steps)
    short_job = flow_inputs(preprocessor, ref_wave, "Short and sweet.", seed=2, nfe_steps=steps)
    assert long_job["durations"].max() > 2000
    alone = flow_mels(infer(server, short_job, model="flow_matching"))
    before = rejected(server, "flow_matching")

    results: queue.Queue = queue.Queue()
    idle = cpu_seconds(flow_stubs(server))
    with tritonclient.grpc.InferenceServerClient(server.urls.grpc) as client:
        doomed = client.async_infer("flow_matching", infer_inputs(tritonclient.grpc, long_job),
                                    callback=lambda result, error: results.put(("long", result, error)))
        client.async_infer("flow_matching", infer_inputs(tritonclient.grpc, short_job),
                           callback=lambda result, error: results.put(("short", result, error)))
        # both were sent within the batcher's 0.2 s queue delay: once a stub has computed for half a second
        # they run as one batch, which the long job keeps busy for a few seconds more
        wait_until(lambda: any(cpu > idle[pid] + 0.5 for pid, cpu in cpu_seconds(idle).items()),
                   what="flow_matching starting the batch")
        doomed.cancel()
        answers = {name: (result, error) for name, result, error in (results.get(timeout=120) for _ in range(2))}
    assert answers["long"][0] is None  # the client saw its cancellation at once
    result, error = answers["short"]
    assert error is None, error
    for got, expected in zip(flow_mels(result), alone):
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # the server noticed between ODE steps and dropped the job
    assert (rejected(server, "flow_matching") - before) == collections.Counter({"cancelled": 1})


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_past_its_timeout_is_stopped_between_steps(server, ref_wave, protocol):
    fields = good_fields(ref_wave, target=LONG_TEXT, nfe_steps=i32(32))
    before = rejected(server, "flow_matching")
    start = time.monotonic()
    status, message = error_of(lambda: infer(server, fields, protocol, timeout=1_000_000))  # microseconds
    assert status == UNAVAILABLE[protocol] and "deadline exceeded" in message and "1 s" in message, message
    assert time.monotonic() - start < 30
    assert (rejected(server, "flow_matching") - before) == collections.Counter({"deadline_exceeded": 1})


@pytest.mark.server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_client_bounds_its_call_by_timeout_over_either_protocol(server, ref_wave, protocol):
    """`client.synthesize(timeout=...)` answers within a roomy bound and raises at once past a short one, over both
    protocols (HTTP bounds the connection it makes; the GPU lane found it refusing gRPC's per-call keyword)."""
    from f5_triton.client import synthesize as client_synthesize

    wave = client_synthesize(url(server, protocol), ref_wave, REF_TEXT, "A bounded call.", protocol=protocol,
                             timeout=120, retries=0)
    assert wave.size > SAMPLE_RATE // 4 and np.isfinite(wave).all()
    start = time.monotonic()
    with pytest.raises(Exception) as caught:
        client_synthesize(url(server, protocol), ref_wave, REF_TEXT, "A call that cannot end in time.",
                          protocol=protocol, timeout=0.01, retries=0)
    assert not isinstance(caught.value, TypeError), caught.value
    assert time.monotonic() - start < 5


# -- real server: metrics ------------------------------------------------------------------------------------

@pytest.mark.server
def test_custom_metrics_are_on_the_metrics_endpoint(server, ref_wave, baseline):
    """Stands alone: it causes every event it reads (one synthesis, one refused request), whatever ran before."""
    audio = metrics(server, "f5_tts_generated_audio_seconds_total")
    rtf_count = metrics(server, "f5_tts_real_time_factor_count")
    refused = rejected(server, "preprocess")
    key = frozenset({("model", "postprocess")})
    wave = synthesize(server, good_fields(ref_wave, seed=i64(99)))
    error_of(lambda: infer(server, good_fields(ref_wave, target_text=text(""))))
    after = metrics(server, "f5_tts_generated_audio_seconds_total")
    assert after[key] - audio.get(key, 0.0) == pytest.approx(len(wave) / SAMPLE_RATE, rel=1e-6)
    assert metrics(server, "f5_tts_real_time_factor_count")[key] == rtf_count.get(key, 0) + 1
    rtf_buckets = metrics(server, "f5_tts_real_time_factor_bucket")  # read after the synthesis: it has samples
    assert {dict(k)["le"] for k in rtf_buckets} >= {"0.1", "1", "+Inf"}  # a real histogram
    assert rejected(server, "preprocess") - refused == collections.Counter({"empty_text": 1})
    assert metrics(server, "nv_inference_request_success")  # Triton's own metrics are still there


# -- faulty deployments ---------------------------------------------------------------------------------------

@pytest.mark.server
def test_nan_weights_are_reported_never_returned_and_a_missing_engine_falls_back(tiny_server, tiny_ckpt,
                                                                               tmp_path, ref_wave):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan_ckpt"
    shutil.copytree(tiny_ckpt, broken)
    weights = load_file(broken / "model.safetensors")
    weights["ema_model.transformer.proj_out.bias"][:] = float("nan")
    save_file(weights, broken / "model.safetensors")
    with tiny_server(ckpt=broken / "model.safetensors", nfe_steps=NFE, dit_engine="onnxruntime",
                     dit_engine_path=tmp_path / "missing.onnx", engine_fallback=True, preprocess_instances=1,
                     postprocess_instances=1) as srv:
        assert "FALLING BACK TO THE TORCH ENGINE" in srv.log_path.read_text(errors="replace")
        for protocol in ("http", "grpc"):
            status, message = error_of(lambda: infer(srv, good_fields(ref_wave), protocol))
            assert status == INTERNAL[protocol] and "NaN/Inf" in message and "not returned as audio" in message
        assert rejected(srv, "flow_matching") == collections.Counter({"not_finite_output": 2})


@pytest.mark.server
def test_a_missing_engine_without_fallback_fails_fast(tiny_server, tmp_path):
    from f5_triton.supervisor.errors import TritonServerError

    start = time.monotonic()
    with pytest.raises(TritonServerError) as info:
        with tiny_server(dit_engine="onnxruntime", dit_engine_path=tmp_path / "missing.onnx", engine_fallback=False,
                         preprocess_instances=1, postprocess_instances=1):
            pass
    assert "exited with status" in str(info.value)  # --exit-on-error: no half-working server
    assert time.monotonic() - start < 120
    log = Path(re.search(r"\(log: (\S+)\)", str(info.value)).group(1)).read_text(errors="replace")
    assert "failed to load 'flow_matching'" in log and "EngineUnavailable" in log and "missing.onnx" in log


# -- real server: a stub killed mid-run (last: it disturbs the server) -------------------------------------

def flow_stubs(server) -> dict[int, str]:
    """Live flow_matching stubs that serve requests (the standby aside): pid -> instance name."""
    from f5_triton.supervisor.watchdog import _stub_instance, python_stubs

    stubs = {pid: _stub_instance(pid) for pid, (state, model) in python_stubs(server.pid).items()
             if model == "flow_matching" and state != "Z"}
    return {pid: name for pid, name in stubs.items() if name and "standby" not in name}


def wait_until(condition, timeout: float = 120.0, what: str = "the server"):
    """Poll a server signal (metrics, process table) until `condition()` returns something true; return it."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what} did not get there in {timeout:.0f} s"
        time.sleep(0.05)
    return result


def cpu_seconds(pids) -> dict[int, float]:
    import psutil

    return {pid: sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids}


PREPROCESS = frozenset({("model", "preprocess"), ("version", "1")})  # a metric's labels


def computing_stub(server, sent: int, before: dict):
    """The flow stub running a batch once all `sent` requests passed preprocess and none waits in
    flow_matching's queue (the batch is inside a stub's process): the one whose CPU time grows. Else None."""
    done = metrics(server, "nv_inference_request_success")[PREPROCESS]
    pending = metrics(server, "nv_inference_pending_request_count")[frozenset({("model", "flow_matching"),
                                                                               ("version", "1")})]
    if done - before["preprocess"] < sent or pending:
        return None
    busy = [pid for pid, cpu in cpu_seconds(before["cpu"]).items() if cpu > before["cpu"][pid] + 0.5]
    return busy[0] if len(busy) == 1 else None


def kill_during_batch(server, ref_wave, in_flight: int, arriving: int, retries: int = 0, in_flight_nfe: int = 64):
    """SIGKILL the flow_matching stub in which `in_flight` long requests run, then send `arriving` more at
    once. Returns (killed pid, in-flight outcomes, arriving outcomes); an outcome is audio or the exception."""
    from f5_triton.client import synthesize as client_synthesize

    before = {"preprocess": metrics(server, "nv_inference_request_success")[PREPROCESS],
              "cpu": cpu_seconds(flow_stubs(server))}

    def attempt(target: str, nfe: int):
        try:
            return client_synthesize(server.urls.grpc, ref_wave, REF_TEXT, target, seed=7, nfe_steps=nfe,
                                     retries=retries, timeout=300)
        except Exception as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(in_flight + arriving) as pool:
        # 64 ODE steps (the limit) by default: the batch outlasts the detection by seconds even on an idle machine
        first = [pool.submit(attempt, LONG_TEXT, in_flight_nfe) for _ in range(in_flight)]
        stub = wait_until(lambda: computing_stub(server, in_flight, before), what="the batch")
        os.kill(stub, signal.SIGKILL)
        later = [pool.submit(attempt, "Reliable servers answer every request.", NFE) for _ in range(arriving)]
        return stub, [f.result() for f in first], [f.result() for f in later]


@pytest.mark.server
def test_a_killed_stub_fails_only_its_own_requests_and_is_replaced(server, ref_wave, baseline):
    from tritonclient.utils import InferenceServerException

    from f5_triton.client import is_retriable, model_restarting
    from f5_triton.gateway.backend import api_error

    assert list(flow_stubs(server).values()) == ["flow_matching_cpu_0_0"]
    start = time.monotonic()
    stub, in_flight, arriving = kill_during_batch(server, ref_wave, in_flight=4, arriving=4)
    # the batch inside the dead process fails, with an error clients retry (a request the batcher had put in an
    # earlier batch finished before the kill and is served)
    failed = [outcome for outcome in in_flight if not isinstance(outcome, np.ndarray)]
    assert failed, "the stub was killed after its batches had finished"
    for outcome in failed:  # the backend's own answer, or the cut a request gets when the dead instance is removed
        assert isinstance(outcome, InferenceServerException), outcome
        assert is_retriable(outcome), (outcome.status(), outcome.message())
        assert api_error(outcome).status == 503, (outcome.status(), outcome.message())
    assert any(model_restarting(outcome) and "flow_matching_cpu_0_0" in outcome.message() for outcome in failed) or \
        all("UNAVAILABLE" in str(outcome.status()) for outcome in failed), [(o.status(), o.message()) for o in failed]
    # requests that arrived while it was replaced waited for the new instance (and shared a batch there)
    for outcome in arriving:
        assert isinstance(outcome, np.ndarray), outcome
        np.testing.assert_allclose(outcome, baseline, atol=1e-4, rtol=0)
    print(f"kill -> {len(arriving)} requests sent after the kill served in {time.monotonic() - start:.1f} s")
    (replacement,) = server.stub_replacements
    assert (replacement.model, replacement.instance, replacement.dead_pid, replacement.error) == (
        "flow_matching", "flow_matching_cpu_0_0", stub, None)
    assert list(flow_stubs(server).values()) == ["flow_matching_cpu_0_0"] and stub not in flow_stubs(server)
    for protocol in ("http", "grpc"):
        np.testing.assert_array_equal(synthesize(server, good_fields(ref_wave), protocol), baseline)


@pytest.mark.server
def test_a_killed_preprocess_stub_has_its_group_made_anew(server, ref_wave, baseline):
    """Models of one instance group (here preprocess) are recovered by the same in-place update."""
    from f5_triton.supervisor.watchdog import _stub_instance, python_stubs

    (stub,) = [pid for pid, (state, model) in python_stubs(server.pid).items() if model == "preprocess" and state != "Z"]
    known = len(server.stub_replacements)
    os.kill(stub, signal.SIGKILL)
    replacement = wait_until(lambda: server.stub_replacements[known:], what="the preprocess replacement")[0]
    assert (replacement.model, replacement.instance, replacement.error) == ("preprocess", "preprocess_0_0", None)
    (new,) = [pid for pid, (state, model) in python_stubs(server.pid).items() if model == "preprocess" and state != "Z"]
    assert new != stub and _stub_instance(new) == "preprocess_0_0"
    np.testing.assert_array_equal(synthesize(server, good_fields(ref_wave)), baseline)


# -- a second server: the vocoder in flow_matching's process, two flow_matching instances -------------------------

@pytest.fixture(scope="module")
def two_flow_server(tiny_server):
    """A second server: the vocoder in flow_matching's process, two flow_matching instances (the gpu repository's
    way, and a dead instance's requests can be retried on the other). The vocoder-in-flow test runs on it first,
    then the two-instance stub kill (it disturbs the server). Last in the module: it lives until the module ends."""
    with tiny_server(vocoder_in_flow=True, flow_instances_per_device=2, nfe_steps=NFE, max_batch_size=4,
                     preferred_batch_sizes=[4], queue_delay_us=200_000, preprocess_instances=1,
                     postprocess_instances=1, exit_timeout_secs=5) as srv:
        yield srv


@pytest.mark.server
def test_vocoder_in_flow_gives_the_same_audio_and_bad_requests_fail_alone(two_flow_server, server, preprocessor,
                                                                           ref_wave, baseline):
    """vocoder_in_flow: flow_matching vocodes its whole batch itself and postprocess gets waveforms. Same audio
    as through the `vocoder` model (this module's server); bad requests sharing the batch fail alone."""
    import tritonclient.grpc

    long_text = "This sentence is long enough to need its own chunk of audio, and then some more words. " * 3
    goods = [good_fields(ref_wave), good_fields(ref_wave[:-8000], long_text, seed=i64(11)),
             good_fields(ref_wave[:-4000], "Good request number two is here.", seed=i64(12))]
    assert len(preprocessor(validate_request(ref_wave[:-8000], REF_TEXT, long_text, seed=11)).jobs) > 1
    expected = [baseline] + [synthesize(server, g) for g in goods[1:]]
    base = flow_inputs(preprocessor, ref_wave, "A bad one.", seed=9)
    bad_jobs = [({**base, "ref_frames": np.array([[0]], np.int32)}, "ref_frames"),
                ({**base, "nfe_steps": np.array([[0]], np.int32)}, "nfe_steps")]
    srv = two_flow_server
    with tritonclient.grpc.InferenceServerClient(srv.urls.grpc) as client:
        outputs = client.get_model_metadata("flow_matching", as_json=True)["outputs"]
    assert [o["name"] for o in outputs] == ["waves", "wave_samples"]
    before = flow_stats(srv)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        good_futures = [pool.submit(synthesize, srv, g) for g in goods]
        bad_futures = [pool.submit(error_of, lambda b=b: infer(srv, b, model="flow_matching")) for b, _ in bad_jobs]
        bad_futures.append(pool.submit(error_of, lambda: infer(srv, good_fields(ref_wave, target_text=text("")))))
        together = [f.result() for f in good_futures]
        errors = [f.result() for f in bad_futures]
    executions = flow_stats(srv)[1] - before[1]
    # postprocess is a model of its own too: exactly one of the two chunk forms
    postprocess_errors = [error_of(lambda a=a: infer(srv, {"ref_rms": f32(0.1), **a}, model="postprocess"))
                          for a in ({}, {"waves": np.zeros((1, 2, 5), np.float32)})]
    assert executions < len(goods) + len(bad_jobs), executions  # good and bad shared flow_matching batches
    for (status, message), field in zip(errors, [f for _, f in bad_jobs] + ["target_text"]):
        assert status == INVALID["grpc"] and f"{field}: " in message, (status, message)
    for status, message in postprocess_errors:
        assert status == INVALID["grpc"] and "send either mel + mel_frames or waves + wave_samples" in message
    for got, want in zip(together, expected):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.server
def test_with_two_flow_instances_and_client_retries_nothing_fails(two_flow_server, ref_wave):
    srv = two_flow_server
    expected = synthesize(srv, good_fields(ref_wave))
    assert sorted(flow_stubs(srv).values()) == ["flow_matching_cpu_0_0", "flow_matching_cpu_1_0"]
    sent = metrics(srv, "nv_inference_request_success")[PREPROCESS]
    # a retried request runs its whole batch again, on two cores: 8 steps instead of 64 still outlast the
    # detection by seconds, and spare CI minutes
    stub, in_flight, arriving = kill_during_batch(srv, ref_wave, in_flight=4, arriving=4, retries=1,
                                                  in_flight_nfe=8)
    # the kill hit a batch: its requests went through the ensemble twice (killed, then retried); the batcher may
    # have given some of the four to the other instance, which finished them
    passes = metrics(srv, "nv_inference_request_success")[PREPROCESS] - sent
    assert 4 + 4 < passes <= 2 * 4 + 4, passes
    assert all(isinstance(o, np.ndarray) for o in in_flight + arriving), [
        o.shape if isinstance(o, np.ndarray) else (type(o).__name__, getattr(o, "status", str)(),
                                                    getattr(o, "message", str)()) for o in in_flight + arriving]
    for outcome in arriving:
        np.testing.assert_allclose(outcome, expected, atol=1e-4, rtol=0)
    assert len({o.shape for o in in_flight}) == 1
    assert [r.error for r in srv.stub_replacements] == [None]
    # the other instance, or the replacement, may answer: the same arithmetic in another process (float noise)
    np.testing.assert_allclose(synthesize(srv, good_fields(ref_wave)), expected, atol=1e-6, rtol=0)
