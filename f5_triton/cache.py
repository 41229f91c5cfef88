"""Bounded in-memory caches: processed reference prompts, and outputs of exact repeats.

* The reference cache keeps what preprocessing makes of a reference clip (level, clipped and
  resampled mel, frames, fixed transcript: `pipeline.Reference`), keyed by a hash of the samples,
  the sample rate and the transcript, so a voice that comes back skips that work.
* The output cache keeps the audio of a request that named an explicit seed, keyed by everything
  that decides the result (reference key, text, sampling parameters, seed, chunking:
  `request_output_key`). Requests without a seed are never cached: each of them must sound different.
  `f5_tts_streaming` keeps a request's pieces; in the `f5_tts` ensemble, preprocess computes the key and
  flow_matching keeps the request's generated chunks (mels, or waveforms when it vocodes), so a repeat
  skips the DiT and only the light postprocess (and the vocoder on the cpu/trt targets) runs again.

Both are `LRUCache`s bounded by entries and by bytes, count hits, misses and evictions, and are
off when built with zero entries or bytes (`cache_from_config` builds them from a model's
`config.CacheConfig`). An optional `observer(event, count)` forwards the counts to a metrics registry;
inside Triton, `f5_triton.serving.metrics.cache_observer` makes them the Prometheus counter
`f5_tts_cache_events_total{model, cache, event}`.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from f5_triton.config import CacheConfig

if TYPE_CHECKING:
    from f5_triton.request import SynthesisRequest

# Events passed to an observer, also the keys of `stats()`.
HIT, MISS, EVICTION = "hits", "misses", "evictions"

Observer = Callable[[str, int], None]


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of one cache's counters and occupancy."""

    name: str
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    max_entries: int
    max_bytes: int

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0


class LRUCache:
    """Least-recently-used cache bounded by entry count and by total bytes; thread-safe.

    Values are stored as given (not copied): callers store immutable values or never mutate them.
    A value larger than `max_bytes` on its own is not stored.
    """

    def __init__(self, name: str, max_entries: int, max_bytes: int, observer: Observer | None = None):
        if max_entries < 0 or max_bytes < 0:
            raise ValueError(f"{name}: cache bounds must be >= 0, got {max_entries} entries, {max_bytes} bytes")
        self.name = name
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.observer = observer
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._counts = {HIT: 0, MISS: 0, EVICTION: 0}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0

    def _count(self, event: str, n: int = 1) -> None:
        self._counts[event] += n
        if self.observer is not None and n:
            self.observer(event, n)

    def get(self, key: Hashable) -> Any | None:
        """The cached value (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self._count(MISS)
                return None
            self._items.move_to_end(key)
            self._count(HIT)
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Store `value` (of `nbytes`), evicting the least recently used; False if it cannot fit."""
        if not self.enabled or nbytes > self.max_bytes:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            evicted = 0
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self._bytes -= size
                evicted += 1
            self._count(EVICTION, evicted)
            return True

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any], size_of: Callable[[Any], int]) -> Any:
        """The cached value, or `compute()` stored under `key`. Disabled caches just compute."""
        if not self.enabled:
            return compute()
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value, size_of(value))
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.name, self._counts[HIT], self._counts[MISS], self._counts[EVICTION],
                              len(self._items), self._bytes, self.max_entries, self.max_bytes)


# --------------------------------------------------------------------------- keys


def _hasher():
    return hashlib.blake2b(digest_size=20)


def _add_text(hasher, value: str) -> None:
    data = value.encode("utf-8", "surrogatepass")
    hasher.update(struct.pack("<Q", len(data)))  # length-prefixed: ("ab", "c") != ("a", "bc")
    hasher.update(data)


def reference_key(wave: np.ndarray, sample_rate: int, reference_text: str) -> str:
    """Content hash of a reference prompt: its float32 samples, sample rate and transcript."""
    samples = np.ascontiguousarray(wave, dtype=np.float32)
    hasher = _hasher()
    hasher.update(b"f5-triton reference v1")
    hasher.update(struct.pack("<qQ", int(sample_rate), samples.size))
    hasher.update(samples.tobytes())  # contiguous float32: the exact bytes the model would see
    _add_text(hasher, reference_text)
    return hasher.hexdigest()


def output_key(reference: str, target_text: str, seed: int | None, **settings: object) -> str | None:
    """Key of a request's audio, or None when the request has no explicit seed (never cached).

    `settings` are every other value the audio depends on (sampling parameters, chunking); they
    are hashed by name, so callers pass them as keywords.
    """
    if seed is None:
        return None
    hasher = _hasher()
    hasher.update(b"f5-triton output v1")
    _add_text(hasher, reference)
    _add_text(hasher, target_text)
    _add_text(hasher, repr(int(seed)))
    for name in sorted(settings):
        _add_text(hasher, name)
        _add_text(hasher, repr(settings[name]))
    return hasher.hexdigest()


def request_output_key(request: SynthesisRequest, **chunking: object) -> str | None:
    """`output_key` of a validated request: its reference, text, seed and sampling parameters, and `chunking` (how
    the model cuts and joins its text, which the audio also depends on). None without an explicit seed."""
    return output_key(reference_key(request.reference_wav, request.sample_rate, request.reference_text),
                      request.target_text, request.seed, nfe_steps=request.nfe_steps,
                      cfg_strength=request.cfg_strength, speed=request.speed,
                      sway_sampling_coef=request.sway_sampling_coef, **chunking)


def bound_key(key: str, arrays: dict[str, np.ndarray]) -> str:
    """`key` bound to the exact inputs it came with (name, dtype, shape and bytes of each array): what a model that
    receives both keeps its outputs under, so that inputs sent with another request's key never answer that
    request. The outputs must be a function of `arrays` alone."""
    hasher = _hasher()
    hasher.update(b"f5-triton bound v1")
    _add_text(hasher, key)
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        _add_text(hasher, f"{name} {array.dtype.str} {array.shape}")
        hasher.update(array.tobytes())
    return hasher.hexdigest()


# --------------------------------------------------------------------------- configuration

def cache_from_config(caches: CacheConfig, name: str, observer: Observer | None = None) -> LRUCache:
    """The `name` ("reference" or "output") cache of `caches` (`<name>_cache_entries` / `<name>_cache_mb`; 0 turns
    it off)."""
    entries, megabytes = getattr(caches, f"{name}_cache_entries"), getattr(caches, f"{name}_cache_mb")
    return LRUCache(name, max(entries, 0), max(int(megabytes * 2**20), 0), observer)
