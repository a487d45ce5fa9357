"""Decoded adapters and prepared switch plans, held in memory under a byte budget with LRU eviction.

Adapters are keyed by name, version and sha256 (a deleted name may come back as version 1 with other
bytes, so the version alone is not an identity). Plans are keyed by the engine's adapter-set key. A miss
loads the bytes from the registry once, however many threads ask at the same time (single flight).
The plan that is applied to the weights right now is pinned and never evicted.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from shira_core.delta import SparseAdapter
from shira_core.errors import ShiraError
from shira_core.fingerprint import BaseFingerprint
from shira_core.io import adapter_from_bytes

from . import metrics
from .errors import InvalidAdapterError


@dataclass
class _Entry:
    value: Any
    nbytes: int
    names: frozenset[str]


def adapter_key(record: Any) -> tuple:
    """Cache key of one stored adapter version (a registry AdapterRecord)."""
    return ("adapter", record.name, record.version, record.sha256)


class AdapterCache:
    """An LRU of adapters and switch plans bounded by bytes.

    Args:
        registry: anything with ``read(record) -> bytes`` (the RedisRegistry).
        fingerprint: the base model's fingerprint; every decoded adapter is checked against it.
        capacity_bytes: the budget; the pinned plan may exceed it on its own.
    """

    def __init__(self, registry: Any, fingerprint: BaseFingerprint | None, capacity_bytes: int) -> None:
        self.registry = registry
        self.fingerprint = fingerprint
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._loading: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        self._pinned: Hashable | None = None
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def adapter(self, record: Any) -> SparseAdapter:
        """The decoded adapter of a registry record, loaded and validated on a miss.

        Raises:
            AdapterNotFoundError / RegistryUnavailableError from the registry, InvalidAdapterError when the
            stored bytes no longer fit this base.
        """
        def load() -> tuple[SparseAdapter, int]:
            data = self.registry.read(record)
            try:
                adapter = adapter_from_bytes(data, base=self.fingerprint, name=record.name)
            except ShiraError as e:
                raise InvalidAdapterError(f"stored adapter {record.name}@{record.version}: {e}") from e
            return adapter, adapter.nbytes

        return self.get(adapter_key(record), load, names=(record.name,))

    def get(self, key: Hashable, load: Callable[[], tuple[Any, int]], names: Iterable[str] = ()) -> Any:
        """The cached value of `key`, or `load()`'s (value, nbytes) stored under it; one load per key at a time.

        Args:
            key: any hashable key.
            load: builds the value on a miss; its exceptions reach every waiting caller and nothing is cached.
            names: adapter names the value depends on, for drop_names().
        """
        with self._lock:
            entry = self._hit(key)
            if entry is not None:
                return entry.value
            future = self._loading.get(key)
            owner = future is None
            if owner:
                future = self._loading[key] = Future()
                self.misses += 1
                metrics.CACHE_MISSES.inc()
        if not owner:
            return future.result()
        try:
            value, nbytes = load()
        except BaseException as e:
            with self._lock:
                del self._loading[key]
            future.set_exception(e)
            raise
        with self._lock:
            del self._loading[key]
            if key not in self._entries:
                self._entries[key] = _Entry(value, int(nbytes), frozenset(names))
                self.bytes += int(nbytes)
            self._evict()
        future.set_result(value)
        return value

    def touch_adapter(self, record: Any) -> bool:
        """Counts a hit and refreshes the LRU order when the record's adapter is cached; never loads."""
        with self._lock:
            return self._hit(adapter_key(record)) is not None

    def _hit(self, key: Hashable) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            metrics.CACHE_HITS.inc()
        return entry

    def has_adapter(self, record: Any) -> bool:
        return adapter_key(record) in self

    def peek(self, key: Hashable) -> Any | None:
        """The cached value without loading or touching the LRU order."""
        with self._lock:
            entry = self._entries.get(key)
            return entry.value if entry else None

    def pin(self, key: Hashable | None) -> None:
        """Marks the plan applied to the weights right now; it stays cached until another is pinned."""
        with self._lock:
            self._pinned = key
            self._evict()

    def drop_names(self, names: Iterable[str]) -> int:
        """Forgets every entry that depends on one of `names` (deleted or replaced adapters), pinned or not.

        Returns:
            Entries dropped.
        """
        names = set(names)
        with self._lock:
            doomed = [k for k, e in self._entries.items() if e.names & names]
            for key in doomed:
                self.bytes -= self._entries.pop(key).nbytes
            metrics.CACHE_BYTES.set(self.bytes)
            return len(doomed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0
            metrics.CACHE_BYTES.set(0)

    def _evict(self) -> None:
        # Least recently used first; the pinned plan is skipped, so the budget may be exceeded by it alone.
        for key in list(self._entries):
            if self.bytes <= self.capacity_bytes:
                break
            if key == self._pinned:
                continue
            self.bytes -= self._entries.pop(key).nbytes
            self.evictions += 1
            metrics.CACHE_EVICTIONS.inc()
        metrics.CACHE_BYTES.set(self.bytes)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def lru_keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        with self._lock:
            return list(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries), "bytes": self.bytes, "capacity_bytes": self.capacity_bytes,
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
            }
