"""Prometheus metrics of the python models, defined in one place.

They are registered through Triton's custom metrics API (`pb_utils.MetricFamily`, python backend
>= 23.04; histograms since 24.07, present in tritonserver 2.51) and appear on Triton's own
/metrics endpoint beside its `nv_inference_*` metrics. Every model stub creates the same families;
Triton's registry merges families of equal name, kind and description, and each metric carries a
`model` label with the Triton model that observed it:

  f5_tts_generated_audio_seconds_total{model}   counter    seconds of audio returned to clients
  f5_tts_real_time_factor{model}                histogram  server time / audio seconds, per request
                                                           (from preprocess picking the request up
                                                           to its audio being ready)
  f5_tts_queue_seconds{model}                   histogram  seconds a stream waited between its arrival and the
                                                           start of its generation (f5_tts_streaming's admission)
  f5_tts_cache_events_total{model,cache,event}  counter    cache hits, misses and evictions (f5_triton.cache)
  f5_tts_rejected_requests_total{model,reason}  counter    requests answered with an error; reason
                                                           is InvalidInputError.reason ("empty_text",
                                                           "audio_too_long", ...), or "cancelled",
                                                           "deadline_exceeded", "busy" (admission limit),
                                                           "queue_timeout" (no start within the queue's limit),
                                                           "not_finite_output",
                                                           "internal"

Imported only inside tritonserver's python backend (`triton_python_backend_utils`).
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from f5_triton.cache import EVICTION, HIT, MISS, Observer
from f5_triton.errors import InvalidInputError, ServerBusyError

AUDIO_SECONDS = "f5_tts_generated_audio_seconds_total"
REAL_TIME_FACTOR = "f5_tts_real_time_factor"
REJECTED = "f5_tts_rejected_requests_total"
CACHE_EVENTS = "f5_tts_cache_events_total"
QUEUE_SECONDS = "f5_tts_queue_seconds"
RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
QUEUE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CANCELLED = "cancelled"
DEADLINE_EXCEEDED = "deadline_exceeded"
NOT_FINITE_OUTPUT = "not_finite_output"
INTERNAL = "internal"


def reason_of(exc: BaseException) -> str:
    """The `reason` label of a failed request."""
    from f5_triton.guards import GenerationError

    if isinstance(exc, (InvalidInputError, ServerBusyError)):
        return exc.reason
    if isinstance(exc, GenerationError):
        return NOT_FINITE_OUTPUT
    return INTERNAL


class Metrics:
    """The metrics one Triton model reports; create it in `initialize` (the families need the stub)."""

    def __init__(self, model: str):
        self.model = model
        # The families must outlive their metrics (Triton refuses to update a metric of a deleted family).
        counter, histogram = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.HISTOGRAM
        self._families = {name: pb_utils.MetricFamily(name=name, description=description, kind=kind)
                          for name, description, kind in (
            (AUDIO_SECONDS, "Seconds of generated audio returned to clients", counter),
            (REAL_TIME_FACTOR, "Server time per second of generated audio, per request", histogram),
            (REJECTED, "Requests answered with an error, by reason", counter),
            (QUEUE_SECONDS, "Seconds a stream waited before its generation started", histogram))}
        self._metrics: dict[tuple[str, str], object] = {}  # (family, reason) -> metric, made on first use

    def _metric(self, family: str, reason: str = ""):
        key = (family, reason)
        if key not in self._metrics:
            labels = {"model": self.model, **({"reason": reason} if reason else {})}
            buckets = {REAL_TIME_FACTOR: RTF_BUCKETS, QUEUE_SECONDS: QUEUE_BUCKETS}.get(family)
            extra = {"buckets": list(buckets)} if buckets else {}
            self._metrics[key] = self._families[family].Metric(labels=labels, **extra)
        return self._metrics[key]

    def rejected(self, reason: str) -> None:
        """Count one request answered with an error."""
        self._metric(REJECTED, reason).increment(1)

    def queued(self, seconds: float) -> None:
        """A stream started after waiting `seconds`."""
        self._metric(QUEUE_SECONDS).observe(seconds)

    def generated(self, audio_seconds: float, server_seconds: float | None) -> None:
        """Count one request's audio; `server_seconds` (None if unknown) feeds the RTF histogram."""
        self._metric(AUDIO_SECONDS).increment(audio_seconds)
        if server_seconds is not None and audio_seconds > 0:
            self._metric(REAL_TIME_FACTOR).observe(server_seconds / audio_seconds)


def cache_observer(model: str, cache: str) -> Observer:
    """An observer (`f5_triton.cache`) counting a cache's events into `f5_tts_cache_events_total`.

    The observer keeps its family alive: a deleted family invalidates its metrics.
    """
    family = pb_utils.MetricFamily(name=CACHE_EVENTS, description="Cache lookups and evictions, by cache",
                                   kind=pb_utils.MetricFamily.COUNTER)
    counters = {event: family.Metric(labels={"model": model, "cache": cache, "event": event})
                for event in (HIT, MISS, EVICTION)}

    def observe(event: str, count: int) -> None:
        counters[event].increment(count)

    observe.family = family
    return observe
