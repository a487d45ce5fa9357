"""RedisRegistry against the real Redis: versions, blobs, atomicity, races, events, outages."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable

import pytest
import redis
import torch

from service.embedded_redis import connect
from service.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    InvalidRequestError,
    RegistryIntegrityError,
    RegistryUnavailableError,
)
from service.registry import RedisRegistry
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.io import adapter_from_bytes, adapter_to_bytes

KeysFn = Callable[[], set[bytes]]
INFO = {"nnz": 12, "density": 0.01, "layers": 2, "base_fingerprint": "fp-abc", "mask": "rand", "description": "d"}


def kinds(keys: set[bytes], namespace: str) -> dict[str, int]:
    """How many keys of each kind (blob, refs, rec, ...) the namespace holds."""
    counts: dict[str, int] = {}
    for key in keys:
        kind = key.decode()[len(namespace) + 1 :].split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def data_keys(keys: set[bytes], namespace: str) -> set[bytes]:
    """The keys other than version counters (seq:<name>, which outlive deletes so versions are never reused)."""
    return {k for k in keys if not k.startswith(f"{namespace}:seq:".encode())}


def assert_consistent(client: redis.Redis, namespace: str) -> None:
    """Every record's chunks exist and name it in their refs; every blob has refs from a live record."""
    p = namespace + ":"
    live: set[str] = set()
    for name in client.zrange(p + "names", 0, -1):
        versions = client.zrange(p + "versions:" + name.decode(), 0, -1)
        assert versions, f"{name!r} is listed without versions"
        for v in versions:
            member = f"{name.decode()}@{v.decode()}"
            rec = client.hgetall(f"{p}rec:{name.decode()}:{v.decode()}")
            assert rec, f"{member} is listed without a record"
            for sha in rec[b"chunks"].decode().split():
                live.add(sha)
                assert client.exists(p + "blob:" + sha), f"{member} misses chunk {sha}"
                assert client.sismember(p + "refs:" + sha, member)
    blobs = {k.decode().rsplit(":", 1)[1] for k in client.scan_iter(match=p + "blob:*")}
    assert blobs == live, f"orphan blobs: {blobs - live}"


def test_round_trip_of_real_adapter_bytes(registry: RedisRegistry) -> None:
    delta = SparseDelta("model.layers.0.mlp.up_proj.weight", (8, 4), torch.tensor([1, 5, 30]), torch.randn(3))
    adapter = SparseAdapter("tiny", {delta.name: delta}, mask="rand", description="three deltas")
    data = adapter_to_bytes(adapter)

    rec = registry.put("tiny", data, {**INFO, "nnz": 3, "layers": 1, "description": "héllo → ünïcode"})

    assert (rec.name, rec.version, rec.bytes, rec.nnz) == ("tiny", 1, len(data), 3)
    assert rec.sha256 == hashlib.sha256(data).hexdigest()
    assert rec.created == pytest.approx(time.time(), abs=60)
    fetched = registry.record("tiny")
    assert fetched == rec and fetched.description == "héllo → ünïcode"
    assert registry.read(fetched) == data
    back = adapter_from_bytes(registry.read(fetched))
    assert torch.equal(back.deltas[delta.name].values, delta.values)
    as_dict = rec.to_dict()
    assert "chunks" not in as_dict and json.loads(json.dumps(as_dict))["sha256"] == rec.sha256


def test_reupload_makes_next_version_and_old_ones_stay_addressable(registry: RedisRegistry) -> None:
    first = registry.put("style", b"one" * 100, INFO)
    second = registry.put("style", b"two" * 100, INFO)

    assert (first.version, second.version) == (1, 2)
    assert registry.record("style").version == 2
    assert registry.read(registry.record("style", 1)) == b"one" * 100
    assert registry.read(registry.record("style", 2)) == b"two" * 100
    assert [r.version for r in registry.versions("style")] == [1, 2]
    assert registry.stamp("style") == f"2:{second.sha256}" == second.stamp
    assert registry.stamp("style", 1) == first.stamp
    with pytest.raises(AdapterNotFoundError, match="'style' version 3"):
        registry.record("style", 3)
    with pytest.raises(InvalidRequestError, match="positive integer"):
        registry.record("style", 0)


def test_list_is_sorted_by_name_paginated_and_counts_names(registry: RedisRegistry) -> None:
    for name in ["delta", "alpha", "charlie", "bravo", "echo"]:
        registry.put(name, name.encode(), INFO)
    registry.put("alpha", b"alpha v2", INFO)

    page, total = registry.list_latest(offset=0, limit=2)
    assert total == 5
    assert [(r.name, r.version) for r in page] == [("alpha", 2), ("bravo", 1)]
    page, total = registry.list_latest(offset=2, limit=2)
    assert [r.name for r in page] == ["charlie", "delta"] and total == 5
    page, total = registry.list_latest(offset=4, limit=50)
    assert [r.name for r in page] == ["echo"]
    assert registry.list_latest(offset=5, limit=2) == ([], 5)
    with pytest.raises(InvalidRequestError, match="limit"):
        registry.list_latest(offset=0, limit=0)
    with pytest.raises(InvalidRequestError, match="offset"):
        registry.list_latest(offset=-1)
    # Redis itself refuses a ZRANGE end past 2**63 - 1; that must be the client's 400, not "registry down"
    with pytest.raises(InvalidRequestError, match="offset"):
        registry.list_latest(offset=2**63 - 2)
    assert registry.list_latest(offset=2**31 - 1, limit=1000) == ([], 5)


def test_identical_content_is_stored_once(redis_client: redis.Redis, namespace: str, ns_keys: KeysFn) -> None:
    registry = RedisRegistry(redis_client, namespace=namespace, chunk_bytes=1000)
    data = os.urandom(3500)  # 4 chunks

    a1 = registry.put("a", data, INFO)
    a2 = registry.put("a", data, INFO)
    b1 = registry.put("b", data, INFO)

    assert a1.sha256 == a2.sha256 == b1.sha256 and len(a1.chunks) == 4
    counts = kinds(ns_keys(), namespace)
    assert counts["blob"] == 4 and counts["refs"] == 4 and "pending" not in counts
    members = redis_client.smembers(f"{namespace}:refs:{a1.chunks[0]}")
    assert members == {b"a@1", b"a@2", b"b@1"}
    assert_consistent(redis_client, namespace)


def test_repeated_chunks_inside_one_adapter_share_a_blob(
    redis_client: redis.Redis, namespace: str, ns_keys: KeysFn
) -> None:
    registry = RedisRegistry(redis_client, namespace=namespace, chunk_bytes=100)
    data = bytes(100) * 5 + b"tail"

    rec = registry.put("zeros", data, INFO)

    assert len(rec.chunks) == 6 and len(set(rec.chunks)) == 2
    assert kinds(ns_keys(), namespace)["blob"] == 2
    assert registry.read(rec) == data
    registry.delete("zeros")
    assert data_keys(ns_keys(), namespace) == set()


def test_delete_leaves_no_key_behind(
    registry: RedisRegistry, redis_client: redis.Redis, namespace: str, ns_keys: KeysFn
) -> None:
    registry.put("keep", b"kept bytes", INFO)
    before = ns_keys()
    registry.chunk_bytes = 1000
    old = registry.put("gone", os.urandom(2500), INFO)
    registry.put("gone", os.urandom(2500), INFO)
    assert len(ns_keys()) > len(before)

    assert registry.delete("gone") == [1, 2]

    assert ns_keys() - before == {f"{namespace}:seq:gone".encode()}  # the version counter alone: never reused
    with pytest.raises(AdapterNotFoundError, match="'gone'"):
        registry.record("gone")
    with pytest.raises(AdapterNotFoundError):
        registry.read(old)
    with pytest.raises(AdapterNotFoundError):
        registry.versions("gone")
    with pytest.raises(AdapterNotFoundError, match="nothing to delete"):
        registry.delete("gone")
    assert registry.stamp("gone") is None
    assert registry.read(registry.record("keep")) == b"kept bytes"
    assert registry.list_latest() == ([registry.record("keep")], 1)


def test_upload_after_delete_gets_the_next_version_and_old_refs_stay_gone(registry: RedisRegistry) -> None:
    old = registry.put("again", b"first life", INFO)
    registry.delete("again")
    new = registry.put("again", b"second life", INFO)

    assert new.version == 2 and new.stamp != old.stamp  # "again@1" never names the second life's bytes
    with pytest.raises(AdapterNotFoundError):
        registry.record("again", 1)
    with pytest.raises(AdapterNotFoundError):
        registry.read(old)  # a stale record never yields the new bytes


def test_blob_shared_by_two_names_survives_deleting_one(
    redis_client: redis.Redis, namespace: str, ns_keys: KeysFn
) -> None:
    registry = RedisRegistry(redis_client, namespace=namespace, chunk_bytes=1000)
    shared = os.urandom(2000)
    registry.put("first", shared, INFO)
    second = registry.put("second", shared + b"own tail", INFO)
    assert second.chunks[:2] == registry.record("first").chunks

    registry.delete("first")

    assert registry.read(registry.record("second")) == shared + b"own tail"
    assert kinds(ns_keys(), namespace)["blob"] == 3
    assert_consistent(redis_client, namespace)
    registry.delete("second")
    assert data_keys(ns_keys(), namespace) == set()


def test_abandoned_upload_is_invisible_and_expires(redis_client: redis.Redis, namespace: str, ns_keys: KeysFn) -> None:
    registry = RedisRegistry(redis_client, namespace=namespace, chunk_bytes=1000, pending_ttl_s=2)
    data = os.urandom(3000)

    written = registry.write_pending("crashed-upload", data)  # the process "dies" before the commit

    assert len(written) == 3
    keys = ns_keys()
    assert set(kinds(keys, namespace)) == {"pending"}
    assert all(0 < redis_client.ttl(k) <= 2 for k in keys)
    with pytest.raises(AdapterNotFoundError):
        registry.record("crashed")
    assert registry.list_latest() == ([], 0)
    deadline = time.monotonic() + 5
    while ns_keys() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ns_keys() == set()


def test_committed_blobs_lose_the_pending_ttl(redis_client: redis.Redis, namespace: str, ns_keys: KeysFn) -> None:
    registry = RedisRegistry(redis_client, namespace=namespace, chunk_bytes=1000, pending_ttl_s=60)
    registry.put("durable", os.urandom(2500), INFO)

    keys = ns_keys()
    assert keys and all(redis_client.ttl(k) == -1 for k in keys)  # -1: no expiry


def test_commit_refuses_when_a_stored_chunk_vanished(
    registry: RedisRegistry, redis_client: redis.Redis, namespace: str, ns_keys: KeysFn
) -> None:
    data = b"shared by a doomed adapter"
    registry.put("doomed", data, INFO)
    assert registry.write_pending("late-upload", data) == []  # skipped: the blob is stored

    registry.delete("doomed")  # ...and now it is gone
    flat = json.dumps(["name", "late", "sha256", "x"])
    result = registry._commit(args=[registry.prefix, "late", "late-upload", flat, "0", *registry.chunk_shas(data)])

    assert int(result[0]) == -1
    assert ns_keys() == {f"{namespace}:seq:doomed".encode()}  # nothing half-written, no version taken


def test_put_retries_with_all_chunks_when_a_delete_races_it(redis_client: redis.Redis, namespace: str) -> None:
    class DeleteRacingRegistry(RedisRegistry):
        raced = False

        def write_pending(self, upload, data, chunks=None, skip_stored=True):  # type: ignore[override]
            written = super().write_pending(upload, data, chunks, skip_stored)
            if not self.raced:
                self.raced = True
                self.delete("original")  # lands between the blob check and the commit
            return written

    registry = DeleteRacingRegistry(redis_client, namespace=namespace, chunk_bytes=10)
    data = os.urandom(45)
    RedisRegistry(redis_client, namespace=namespace, chunk_bytes=10).put("original", data, INFO)

    rec = registry.put("copy", data, INFO)

    assert registry.raced and rec.version == 1
    assert registry.read(registry.record("copy")) == data
    assert_consistent(redis_client, namespace)


def test_concurrent_uploads_of_one_name_get_distinct_versions(redis_client: redis.Redis, namespace: str) -> None:
    registry = RedisRegistry(redis_client, namespace=namespace, chunk_bytes=64)
    payloads = [os.urandom(200) for _ in range(8)]
    barrier = threading.Barrier(len(payloads))
    results: dict[int, bytes] = {}

    def upload(data: bytes) -> None:
        barrier.wait()
        results[registry.put("busy", data, INFO).version] = data

    threads = [threading.Thread(target=upload, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert sorted(results) == list(range(1, 9))
    for version, data in results.items():
        assert registry.read(registry.record("busy", version)) == data
    assert_consistent(redis_client, namespace)


def test_racing_if_absent_uploads_store_exactly_one(redis_client: redis.Redis, namespace: str) -> None:
    registry = RedisRegistry(redis_client, namespace=namespace, chunk_bytes=64)
    payloads = [os.urandom(200) for _ in range(8)]
    barrier = threading.Barrier(len(payloads))
    won: list[bytes] = []
    refused: list[str] = []

    def upload(data: bytes) -> None:
        barrier.wait()
        try:
            registry.put("once", data, INFO, if_absent=True)
            won.append(data)
        except AdapterConflictError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=upload, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert len(won) == 1 and len(refused) == 7
    assert all("'once' already exists (version 1)" in e for e in refused)
    assert registry.read(registry.record("once")) == won[0]
    assert [r.version for r in registry.versions("once")] == [1]
    assert_consistent(redis_client, namespace)
    assert not list(redis_client.scan_iter(match=namespace + ":pending:*"))  # the losers left no chunks behind


def test_racing_uploads_and_deletes_keep_the_store_consistent(
    redis_client: redis.Redis, namespace: str, ns_keys: KeysFn
) -> None:
    registry = RedisRegistry(redis_client, namespace=namespace, chunk_bytes=16)
    shared = os.urandom(64)  # every upload shares these chunks, so deletes and commits fight over them
    stop = time.monotonic() + 3
    errors: list[BaseException] = []

    def uploader(i: int) -> None:
        try:
            while time.monotonic() < stop:
                registry.put("contended", shared + os.urandom(8), INFO)
                registry.put(f"other-{i}", shared, INFO)
        except BaseException as e:  # surfaced by the assert below
            errors.append(e)

    def deleter() -> None:
        while time.monotonic() < stop:
            for name in ("contended", "other-0", "other-1"):
                with contextlib.suppress(AdapterNotFoundError):
                    registry.delete(name)

    threads = [threading.Thread(target=uploader, args=(i,)) for i in range(2)]
    threads += [threading.Thread(target=deleter) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    assert errors == []
    assert_consistent(redis_client, namespace)
    for rec in registry.list_latest(limit=10)[0]:
        assert registry.read(rec)[:64] == shared
    for name in ("contended", "other-0", "other-1"):
        with contextlib.suppress(AdapterNotFoundError):
            registry.delete(name)
    assert data_keys(ns_keys(), namespace) == set()


def test_events_reach_a_listener(registry: RedisRegistry) -> None:
    events: queue.Queue[dict] = queue.Queue()
    stop = threading.Event()
    listener = registry.listen(events.put, stop)
    assert listener.subscribed.wait(5)

    rec = registry.put("news", b"fresh", INFO)
    registry.put("news", b"fresher", INFO)
    registry.delete("news")

    assert events.get(timeout=5) == {"op": "put", "name": "news", "version": 1, "sha256": rec.sha256}
    assert events.get(timeout=5)["version"] == 2
    assert events.get(timeout=5) == {"op": "delete", "name": "news", "version": 2, "versions": [1, 2]}
    stop.set()
    listener.join(5)
    assert not listener.is_alive()


def test_listener_outlives_a_failing_callback(registry: RedisRegistry) -> None:
    seen: queue.Queue[dict] = queue.Queue()

    def flaky(event: dict) -> None:
        seen.put(event)
        raise RuntimeError("callback bug")

    stop = threading.Event()
    listener = registry.listen(flaky, stop)
    assert listener.subscribed.wait(5)
    registry.put("a", b"1", INFO)
    registry.put("b", b"2", INFO)

    assert [seen.get(timeout=5)["name"], seen.get(timeout=5)["name"]] == ["a", "b"]
    assert listener.is_alive()
    stop.set()
    listener.join(5)


def test_unreachable_redis_fails_fast_and_logs_the_url_clients_never_see(caplog: pytest.LogCaptureFixture) -> None:
    registry = RedisRegistry(connect("redis://127.0.0.1:1/0"), namespace="nowhere")

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="service.registry"), pytest.raises(
        RegistryUnavailableError, match="retry shortly"
    ) as info:
        registry.record("anything")
    assert time.monotonic() - started < 3
    assert info.value.status == 503
    assert "127.0.0.1" not in info.value.message and ":1/" not in info.value.message
    assert "redis://127.0.0.1:1/0" in caplog.text and "ConnectionError" in caplog.text
    with pytest.raises(RegistryUnavailableError):
        registry.put("anything", b"data", INFO)
    with pytest.raises(RegistryUnavailableError):
        registry.list_latest()
    assert registry.ping() is False


def test_large_adapter_round_trips_through_several_chunks(
    registry: RedisRegistry, redis_client: redis.Redis, namespace: str, ns_keys: KeysFn
) -> None:
    data = os.urandom(20 * 2**20)

    rec = registry.put("big", data, INFO)

    assert len(rec.chunks) == 5 and rec.bytes == len(data)  # 4 MiB chunks
    assert kinds(ns_keys(), namespace)["blob"] == 5
    assert registry.read(registry.record("big")) == data


@pytest.mark.parametrize(
    "name", ["Upper", "a:b", "a@1", "", "-lead", "x" * 65, "../etc", "sp ace", "evil\n", "a\nb", "x²"]
)
def test_bad_names_are_refused_and_nothing_is_written(
    registry: RedisRegistry, redis_client: redis.Redis, namespace: str, name: str, ns_keys: KeysFn
) -> None:
    for call in (
        lambda: registry.put(name, b"data", INFO),
        lambda: registry.record(name),
        lambda: registry.delete(name),
        lambda: registry.stamp(name),
    ):
        with pytest.raises(InvalidRequestError, match="adapter name"):
            call()
    assert ns_keys() == set()


def test_bad_info_is_refused_and_nothing_is_written(
    registry: RedisRegistry, redis_client: redis.Redis, namespace: str, ns_keys: KeysFn
) -> None:
    with pytest.raises(InvalidRequestError, match="lacks nnz, base_fingerprint"):
        registry.put("ok", b"data", {"density": 0.1, "layers": 1})
    with pytest.raises(InvalidRequestError, match="density=1.5"):
        registry.put("ok", b"data", {**INFO, "density": 1.5})
    with pytest.raises(InvalidRequestError, match="empty"):
        registry.put("ok", b"", INFO)
    assert ns_keys() == set()


def test_read_detects_changed_bytes(registry: RedisRegistry, redis_client: redis.Redis) -> None:
    rec = registry.put("tampered", b"original bytes", INFO)
    redis_client.set(f"{registry.prefix}blob:{rec.chunks[0]}", b"evil bytes!!!!")

    with pytest.raises(RegistryIntegrityError, match="tampered@1"):
        registry.read(rec)


def test_the_public_adapter_schema_carries_every_stored_field_and_no_other() -> None:
    from service.protocol import AdapterInfo
    from service.registry_records import AdapterRecord

    record = AdapterRecord("boolq", 3, "ab" * 32, "f" * 16, 10, 0.01, 120, 2, "rand", "d", 1.5, ("c1", "c2"))
    # The stored record and the API schema are separate classes (storage layout vs public contract); a field
    # added to one alone would be dropped from, or missing in, every API answer.
    assert AdapterInfo(**record.to_dict()).model_dump() == record.to_dict()


def test_pending_counts_the_chunks_of_uploads_that_never_committed(
    redis_client: redis.Redis, namespace: str, ns_keys: KeysFn
) -> None:
    registry = RedisRegistry(redis_client, namespace=namespace, chunk_bytes=1000)
    assert registry.pending() == (0, 0, True)
    registry.put("done", os.urandom(2500), INFO)  # committed: its pending keys are gone
    assert registry.pending() == (0, 0, True)

    # A server that dies between writing chunks and the commit leaves them behind until their TTL.
    written = registry.write_pending("crashed", os.urandom(3500))
    assert len(written) == 4
    assert registry.pending() == (4, 3500, True)
    assert 0 < redis_client.ttl(f"{namespace}:pending:crashed:{written[0]}") <= registry.pending_ttl_s
    other = RedisRegistry(redis_client, namespace=namespace + "-other", chunk_bytes=1000)
    assert other.pending() == (0, 0, True)  # another namespace's chunks are not ours

    chunks, size, complete = registry.pending(max_keys=2)  # bounded: a lower bound, flagged as such
    assert (chunks, complete) == (2, False) and size in (1500, 2000)  # SCAN order: maybe the 500-byte tail
    chunks, size, complete = registry.pending(max_calls=1)
    assert complete or chunks <= 4
    for key in ns_keys():
        if b":pending:" in key:
            redis_client.delete(key)
    assert registry.pending() == (0, 0, True)
