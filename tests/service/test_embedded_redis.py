"""The embedded valkey server: persistence across restarts, one server per data dir, listener reconnects."""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import pytest

from service.embedded_redis import connect, start_embedded
from service.errors import RegistryUnavailableError
from service.registry import RedisRegistry

INFO = {"nnz": 5, "density": 0.5, "layers": 1, "base_fingerprint": "fp", "mask": "rand", "description": "kept"}


def test_adapter_survives_a_restart_on_the_same_data_dir(tmp_path: Path) -> None:
    data = os.urandom(3 * 2**20 + 123)
    server = start_embedded(tmp_path)
    try:
        registry = RedisRegistry(connect(server.url), chunk_bytes=2**20)
        rec = registry.put("persisted", data, INFO)
        registry.put("persisted", b"second version", INFO)
        registry.client.close()
    finally:
        server.stop()
    assert not server.running
    assert (tmp_path / "registry" / "appendonlydir").is_dir()

    again = start_embedded(tmp_path)
    try:
        registry = RedisRegistry(connect(again.url), chunk_bytes=2**20)
        assert registry.record("persisted", 1) == rec
        assert registry.read(registry.record("persisted", 1)) == data
        assert registry.record("persisted").version == 2
        assert registry.put("persisted", b"third", INFO).version == 3  # the counter survived too
        registry.client.close()
    finally:
        again.stop()


def test_a_second_server_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with start_embedded(tmp_path) as server:
        with pytest.raises(RegistryUnavailableError, match=f"in use by another server \\(pid {server.process.pid}\\)"):
            start_embedded(tmp_path)
        assert connect(server.url).ping()
    with start_embedded(tmp_path) as replacement:  # the lock went with the first server
        assert connect(replacement.url).ping()


def test_stop_is_idempotent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = start_embedded(tmp_path)
    server.stop()
    server.stop()
    assert not server.running
    with pytest.raises(RegistryUnavailableError, match="unavailable"), caplog.at_level("WARNING"):
        RedisRegistry(connect(server.url)).record("anything")
    assert server.url.rsplit("/", 1)[0] in caplog.text  # the address is logged, not sent to clients


def test_listener_reconnects_after_the_server_restarts(tmp_path: Path) -> None:
    server = start_embedded(tmp_path)
    port = server.port
    client = connect(server.url)
    registry = RedisRegistry(client)
    events: queue.Queue[dict] = queue.Queue()
    stop = threading.Event()
    listener = registry.listen(events.put, stop)
    try:
        assert listener.subscribed.wait(5)
        registry.put("before", b"1", INFO)
        assert events.get(timeout=5)["name"] == "before"

        server.stop()
        time.sleep(1.0)  # the listener sees the outage and backs off
        server = start_embedded(tmp_path, port=port)

        assert events.get(timeout=15) == {"op": "resync", "name": "", "version": 0}
        registry.put("after", b"2", INFO)
        event = events.get(timeout=5)
        assert (event["op"], event["name"], event["version"]) == ("put", "after", 1)
        assert listener.is_alive() and listener.reconnects >= 1
    finally:
        stop.set()
        listener.join(10)
        client.close()
        server.stop()
    assert not listener.is_alive()


def test_connect_uses_short_timeouts_and_bytes() -> None:
    client = connect("redis://127.0.0.1:6379/15")
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] <= 10 and kwargs["socket_connect_timeout"] <= 5
    assert kwargs["health_check_interval"] > 0
    assert client.get_encoder().decode_responses is False
