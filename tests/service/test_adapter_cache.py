"""AdapterCache: LRU by bytes, single-flight loads, the pinned plan survives, failures are not cached."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from service.adapter_cache import AdapterCache, adapter_key
from service.errors import AdapterNotFoundError, InvalidAdapterError
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.fingerprint import BaseFingerprint
from shira_core.io import adapter_to_bytes


@dataclass
class Record:
    name: str
    version: int
    sha256: str


class DictRegistry:
    """Holds adapter bytes in a dict and counts reads; only for these cache unit tests."""

    def __init__(self, delay: float = 0.0) -> None:
        self.blobs: dict[tuple[str, int], bytes] = {}
        self.reads = 0
        self.delay = delay
        self._lock = threading.Lock()

    def read(self, record: Record) -> bytes:
        with self._lock:
            self.reads += 1
        time.sleep(self.delay)
        try:
            return self.blobs[(record.name, record.version)]
        except KeyError:
            raise AdapterNotFoundError(f"adapter {record.name!r} version {record.version} not found") from None


def loader(value, nbytes, calls=None):
    def load():
        if calls is not None:
            calls.append(value)
        return value, nbytes
    return load


def test_lru_evicts_least_recently_used_by_bytes():
    cache = AdapterCache(None, None, capacity_bytes=100)
    cache.get("a", loader("A", 40))
    cache.get("b", loader("B", 40))
    cache.get("a", loader("never", 40))  # hit: a becomes most recent
    cache.get("c", loader("C", 40))  # 120 > 100: b goes
    assert cache.lru_keys() == ["a", "c"]
    assert cache.bytes == 80
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (1, 3, 1)


def test_pinned_plan_is_never_evicted():
    cache = AdapterCache(None, None, capacity_bytes=100)
    cache.get("plan", loader("P", 60))
    cache.pin("plan")
    cache.get("x", loader("X", 30))
    cache.get("y", loader("Y", 30))  # 120: the pinned plan is older but x goes instead
    assert "plan" in cache and "x" not in cache and "y" in cache
    cache.get("huge", loader("H", 150))  # bigger than the budget: evicted at once, pinned stays
    assert cache.lru_keys() == ["plan"]
    cache.pin(None)
    cache.get("z", loader("Z", 50))
    assert "plan" not in cache and "z" in cache


def test_concurrent_misses_load_once():
    cache = AdapterCache(None, None, capacity_bytes=1000)
    calls = []
    gate = threading.Event()

    def slow():
        calls.append(1)
        gate.wait(5)
        return "V", 10

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", slow))) for _ in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert results == ["V"] * 8
    assert calls == [1]
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 0


def test_failed_load_reaches_every_waiter_and_is_not_cached():
    cache = AdapterCache(None, None, capacity_bytes=1000)
    gate = threading.Event()

    def broken():
        gate.wait(5)
        raise AdapterNotFoundError("adapter 'gone' not found")

    errors = []

    def ask():
        try:
            cache.get("k", broken)
        except AdapterNotFoundError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    gate.set()
    for t in threads:
        t.join(5)
    assert errors == ["adapter 'gone' not found"] * 4
    assert "k" not in cache
    assert cache.get("k", loader("ok", 1)) == "ok"


def tiny_adapter(name: str = "ad", nnz: int = 20) -> SparseAdapter:
    idx = torch.arange(0, nnz * 3, 3, dtype=torch.int32)
    vals = torch.randn(nnz)
    return SparseAdapter(name, {"w": SparseDelta("w", (16, 8), idx, vals)}, mask="rand")


def test_adapter_is_decoded_once_per_record_and_dropped_by_name():
    registry = DictRegistry(delay=0.05)
    adapter = tiny_adapter()
    registry.blobs[("ad", 1)] = adapter_to_bytes(adapter)
    registry.blobs[("ad", 2)] = adapter_to_bytes(tiny_adapter(nnz=5))
    cache = AdapterCache(registry, None, capacity_bytes=10_000)
    r1, r2 = Record("ad", 1, "aa"), Record("ad", 2, "bb")
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.adapter(r1))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert registry.reads == 1
    assert all(g is got[0] for g in got)
    assert torch.equal(got[0].deltas["w"].values, adapter.deltas["w"].values)
    assert cache.bytes == adapter.nbytes
    cache.adapter(r2)
    cache.get(("plan", "ad@1"), loader("P", 7), names=["ad", "other"])
    cache.get(("plan", "zz"), loader("Q", 7), names=["zz"])
    assert cache.drop_names(["ad"]) == 3
    assert cache.lru_keys() == [("plan", "zz")] and cache.bytes == 7
    assert adapter_key(r1) not in cache


def test_stored_adapter_that_no_longer_fits_the_base_is_refused():
    model = torch.nn.Linear(8, 4, bias=False)  # weight shape (4, 8): the adapter says (16, 8)
    fingerprint = BaseFingerprint.of(model)
    registry = DictRegistry()
    registry.blobs[("ad", 1)] = adapter_to_bytes(tiny_adapter())
    cache = AdapterCache(registry, fingerprint, capacity_bytes=10_000)
    with pytest.raises(InvalidAdapterError, match="ad@1"):
        cache.adapter(Record("ad", 1, "aa"))
    with pytest.raises(AdapterNotFoundError, match="version 9"):
        cache.adapter(Record("ad", 9, "cc"))
    assert cache.lru_keys() == []


def test_touch_adapter_counts_hits_and_refreshes_lru_but_never_loads():
    cache = AdapterCache(None, None, capacity_bytes=100)
    first, second = SimpleNamespace(name="a", version=1, sha256="x"), SimpleNamespace(name="b", version=1, sha256="y")
    assert cache.touch_adapter(first) is False  # not cached: no load, no miss counted
    cache.get(adapter_key(first), loader("A", 40))
    cache.get(adapter_key(second), loader("B", 40))
    assert cache.touch_adapter(first) is True
    assert cache.lru_keys() == [adapter_key(second), adapter_key(first)]
    assert (cache.stats()["hits"], cache.stats()["misses"]) == (1, 2)
