"""Reference-prompt and output caches: bounds, keys, counters, and identical results on a hit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from f5_triton.cache import (
    LRUCache,
    bound_key,
    cache_from_config,
    output_key,
    reference_key,
)
from f5_triton.pipeline import TTS
from f5_triton.request import validate_request
from f5_triton.streaming import StreamingSynthesizer
from f5_triton.text import StreamingChunker

REF_TEXT = "Some call me nature, others call me mother nature."
TEXT = "A cached voice sounds the same. And so does a cached answer."


@pytest.fixture(scope="module")
def tts(tiny_ckpt):
    return TTS.from_paths(tiny_ckpt / "model.safetensors", tiny_ckpt / "vocab.txt", tiny_ckpt / "vocos")


# --------------------------------------------------------------------------- LRUCache


def test_lru_bounded_by_entries_in_recency_order():
    events = []
    cache = LRUCache("t", max_entries=2, max_bytes=1000, observer=lambda event, n: events.append((event, n)))
    cache.put("a", 1, 10)
    cache.put("b", 2, 10)
    assert cache.get("a") == 1  # "a" is now the most recent
    cache.put("c", 3, 10)  # evicts "b"
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries, stats.bytes) == (3, 1, 1, 2, 20)
    assert events == [("hits", 1), ("evictions", 1), ("misses", 1), ("hits", 1), ("hits", 1)]


def test_lru_bounded_by_bytes():
    cache = LRUCache("t", max_entries=100, max_bytes=100)
    for i in range(5):
        cache.put(i, i, 30)
    assert len(cache) == 3 and cache.stats().bytes == 90 and cache.stats().evictions == 2
    assert cache.get(0) is None and cache.get(4) == 4
    assert not cache.put("huge", 0, 101)  # larger than the whole cache: not stored, nothing evicted
    assert len(cache) == 3
    cache.put(4, "replaced", 50)  # replacing an entry re-counts its bytes
    assert cache.get(4) == "replaced" and cache.stats().bytes <= 100


def test_disabled_cache_computes_and_stores_nothing():
    for cache in (LRUCache("t", 0, 100), LRUCache("t", 10, 0)):
        calls = []
        assert cache.get_or_compute("k", lambda: calls.append(1) or "v", len) == "v"
        assert cache.get_or_compute("k", lambda: calls.append(1) or "v", len) == "v"
        assert calls == [1, 1] and len(cache) == 0 and not cache.stats().enabled
    with pytest.raises(ValueError, match="t: cache bounds must be >= 0, got -1 entries"):
        LRUCache("t", -1, 10)


def test_cache_from_config():
    from f5_triton.config import DEFAULT_CACHES, CacheConfig

    cache = cache_from_config(CacheConfig(output_cache_entries=3, output_cache_mb=0.5), "output")
    assert (cache.max_entries, cache.max_bytes, cache.enabled) == (3, 2**19, True)
    assert cache_from_config(DEFAULT_CACHES, "reference").max_entries == DEFAULT_CACHES.reference_cache_entries
    assert not cache_from_config(CacheConfig(reference_cache_entries=0), "reference").enabled


# --------------------------------------------------------------------------- keys


def test_reference_key_is_a_content_hash(ref_wave):
    key = reference_key(ref_wave, 24000, REF_TEXT)
    assert key == reference_key(ref_wave.copy(), 24000, REF_TEXT)
    assert key == reference_key(ref_wave.astype(np.float64), 24000, REF_TEXT)  # the float32 samples count
    changed = ref_wave.copy()
    changed[1000] += 1e-3
    assert len({key, reference_key(changed, 24000, REF_TEXT), reference_key(ref_wave, 16000, REF_TEXT),
                reference_key(ref_wave, 24000, REF_TEXT + " "), reference_key(ref_wave[:-1], 24000, REF_TEXT)}) == 5


def test_output_key_needs_a_seed_and_every_setting():
    assert output_key("ref", "text", None, nfe_steps=32) is None
    key = output_key("ref", "text", 1, nfe_steps=32, speed=1.0)
    assert key == output_key("ref", "text", 1, speed=1.0, nfe_steps=32)
    others = {output_key("ref", "text", 2, nfe_steps=32, speed=1.0), output_key("ref", "text", 1, nfe_steps=16, speed=1.0),
              output_key("ref", "text", 1, nfe_steps=32, speed=1.1), output_key("ref", "text!", 1, nfe_steps=32, speed=1.0),
              output_key("ref2", "text", 1, nfe_steps=32, speed=1.0), output_key("re", "ftext", 1, nfe_steps=32, speed=1.0)}
    assert key not in others and len(others) == 6


# --------------------------------------------------------------------------- in the pipeline


def test_bound_key_follows_every_input():
    arrays = {"tokens": np.arange(6, dtype=np.int32).reshape(2, 3), "seeds": np.array([7, 8], dtype=np.int64)}
    key = bound_key("k", arrays)
    assert bound_key("k", {name: value.copy() for name, value in arrays.items()}) == key
    assert bound_key("other", arrays) != key
    for changed in ({**arrays, "seeds": np.array([7, 9], dtype=np.int64)},  # a value
                    {**arrays, "tokens": arrays["tokens"].reshape(3, 2)},  # a shape
                    {**arrays, "seeds": arrays["seeds"].astype(np.int32)},  # a type
                    {"tokens": arrays["tokens"]}):  # an input left out
        assert bound_key("k", changed) != key


def test_reference_cache_hit_gives_identical_jobs(tts, ref_wave):
    from f5_triton.pipeline import Preprocessor

    cached = Preprocessor(tts.preprocess.tokenizer, cache=LRUCache("reference", 4, 2**24))
    request = validate_request(ref_wave, REF_TEXT, TEXT, seed=3, nfe_steps=4)
    plain = tts.preprocess(request)
    first, second = cached(request), cached(validate_request(ref_wave.copy(), REF_TEXT, "Another text.", seed=3))
    stats = cached.cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.bytes >= first.jobs[0].ref_mel.numel() * 4
    assert second.jobs[0].ref_mel is first.jobs[0].ref_mel  # the processed reference was reused, not recomputed
    for a, b in zip(first.jobs, plain.jobs):
        assert bool((a.ref_mel == b.ref_mel).all()) and a.tokens == b.tokens and a.duration == b.duration
    assert first.ref_rms == plain.ref_rms and first.chunks == plain.chunks
    # a different transcript is a different reference
    cached(validate_request(ref_wave, REF_TEXT + " Yes.", TEXT))
    assert cached.cache.stats().misses == 2


def test_output_cache_replays_seeded_requests_only(tts, ref_wave):
    calls = []

    class CountingFlowMatcher:
        def __call__(self, jobs, on_step=None):
            calls.append(len(jobs))
            return tts.flow_matching(jobs, on_step)

    stages = dataclasses.replace(tts.stages(StreamingChunker()), flow_matching=CountingFlowMatcher())
    streamer = StreamingSynthesizer(stages, output_cache=LRUCache("output", 4, 2**26))
    seeded = validate_request(ref_wave, REF_TEXT, TEXT, seed=9, nfe_steps=2)
    first = list(streamer.stream(seeded))
    generated = len(calls)
    again = list(streamer.stream(validate_request(ref_wave, REF_TEXT, TEXT, seed=9, nfe_steps=2)))
    assert len(calls) == generated  # nothing generated for the repeat
    assert [p.chunk_index for p in again] == [p.chunk_index for p in first] and again[-1].is_final
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a.audio, b.audio)
    other_seed = streamer.synthesize(validate_request(ref_wave, REF_TEXT, TEXT, seed=10, nfe_steps=2))
    assert not np.array_equal(other_seed, np.concatenate([p.audio for p in first]))
    stats = streamer.output_cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 2, 2)

    unseeded = validate_request(ref_wave, REF_TEXT, TEXT, nfe_steps=2)
    a, b = streamer.synthesize(unseeded), streamer.synthesize(unseeded)
    assert not np.array_equal(a, b)  # never cached: every unseeded request draws new noise
    assert streamer.output_cache.stats().entries == 2 and streamer.output_cache.stats().misses == 2

    # a stream abandoned half-way is not cached
    pieces = streamer.stream(validate_request(ref_wave, REF_TEXT, TEXT, seed=11, nfe_steps=2))
    next(pieces)
    pieces.close()
    assert streamer.output_cache.stats().entries == 2


# --------------------------------------------------------------------------- Triton


@pytest.fixture
def cache_events(metric_samples):
    """(model, cache, event) -> count, from Triton's Prometheus endpoint."""
    def read(server) -> dict[tuple[str, str, str], float]:
        return {(labels["model"], labels["cache"], labels["event"]): value
                for (_, items), value in metric_samples(server, "f5_tts_cache_events").items()
                for labels in [dict(items)]}

    return read


def delta(before, after, *key) -> float:
    return after.get(key, 0) - before.get(key, 0)


@pytest.mark.server
def test_server_output_cache_repeats_seeded_streams(streaming_server, ref_wave, cache_events):
    from f5_triton.client import stream_synthesize

    def run(**optional):
        return list(stream_synthesize(streaming_server.urls.grpc, ref_wave, REF_TEXT, TEXT, timeout=120, nfe_steps=8,
                                      **optional))

    before = cache_events(streaming_server)
    first = run(seed=123)
    again = run(seed=123)
    assert len(first) == len(again) > 1
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    after = cache_events(streaming_server)
    assert delta(before, after, "f5_tts_streaming", "output", "misses") == 1
    assert delta(before, after, "f5_tts_streaming", "output", "hits") == 1
    a, b = run(), run()
    assert not np.array_equal(np.concatenate(a), np.concatenate(b))  # unseeded: never from the cache
    unseeded = cache_events(streaming_server)
    assert all(delta(after, unseeded, "f5_tts_streaming", "output", event) == 0 for event in ("hits", "misses"))
    assert delta(after, unseeded, "f5_tts_streaming", "reference", "hits") == 2  # the voice is still cached


@pytest.mark.server
def test_server_output_cache_repeats_seeded_f5_tts_requests(streaming_server, ref_wave, cache_events):
    """`f5_tts` has the streaming model's output cache (same key, limits, metric): flow_matching keeps a seeded
    request's generated chunks, so the same request again skips the DiT, is much faster and gives the same bytes;
    requests without a seed are never looked up."""
    import time

    from f5_triton.client import synthesize

    text = "The ensemble says it again."

    def run(nfe_steps=16, **optional):
        start = time.perf_counter()
        audio = synthesize(streaming_server.urls.grpc, ref_wave, REF_TEXT, text, nfe_steps=nfe_steps, timeout=300,
                           **optional)
        return audio, time.perf_counter() - start

    before = cache_events(streaming_server)
    (first, cold), (again, warm) = run(seed=321), run(seed=321)
    print(f"f5_tts seeded request: {cold:.2f} s computed, {warm:.2f} s from the output cache")
    np.testing.assert_array_equal(first, again)
    assert warm < cold / 3
    after = cache_events(streaming_server)
    assert delta(before, after, "flow_matching", "output", "misses") == 1
    assert delta(before, after, "flow_matching", "output", "hits") == 1
    (a, _), (b, _) = run(nfe_steps=2), run(nfe_steps=2)
    assert not np.array_equal(a, b)  # unseeded: never from the cache
    unseeded = cache_events(streaming_server)
    assert all(delta(after, unseeded, "flow_matching", "output", event) == 0 for event in ("hits", "misses"))


@pytest.mark.server
def test_server_reference_cache_hits_keep_ensemble_results(streaming_server, tts, ref_wave, cache_events):
    """`f5_tts` with the reference cache: the second use of a voice is a hit and still equals the
    uncached in-process pipeline."""
    from f5_triton.client import synthesize

    voice = ref_wave * np.float32(0.9)  # a voice no other test sent
    before = cache_events(streaming_server)
    for text in ("First use of this voice.", "Second use, from the cache."):
        got = synthesize(streaming_server.urls.grpc, voice, REF_TEXT, text, seed=5, nfe_steps=4)
        expected = tts.synthesize([validate_request(voice, REF_TEXT, text, seed=5, nfe_steps=4)])[0]
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
    after = cache_events(streaming_server)
    assert delta(before, after, "preprocess", "reference", "misses") == 1
    assert delta(before, after, "preprocess", "reference", "hits") == 1
