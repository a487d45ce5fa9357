"""A Redis outage and recovery, with the real Engine on a tiny Llama and the embedded valkey server.

The server is stopped under a running app and started again on the same port and data directory: cached
adapters keep serving, everything that needs Redis answers 503 and writes nothing, and once Redis is back
the app is ready again, uploads work and registry events arrive again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from random_adapters import random_adapter
from support import tiny_model

from service.config import Settings
from service.embedded_redis import EmbeddedRedis, connect, start_embedded
from service.engine import Engine
from service.main import create_app
from service.registry import RedisRegistry
from shira_core.io import adapter_to_bytes

ADMIN = "outage-admin-" + "x" * 24
AUTH = {"Authorization": f"Bearer {ADMIN}"}
PROMPT = "Once upon a time"
NEW = 8


class Server:
    """The embedded server of one data dir, which the test stops and starts again on the same port."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.current: EmbeddedRedis = start_embedded(data_dir)
        self.port = self.current.port

    def stop(self) -> None:
        self.current.stop()

    def restart(self) -> None:
        self.current = start_embedded(self.data_dir, port=self.port)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    s = Server(tmp_path)
    yield s
    s.stop()


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_error(response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error["message"]


def test_cached_adapters_serve_through_an_outage_and_everything_recovers(server, tokenizer):
    namespace = f"test-{uuid.uuid4().hex[:12]}"
    registry = RedisRegistry(connect(server.current.url, connect_timeout=0.5), namespace=namespace)
    observer = connect(server.current.url)  # a second client, only to look at the stored keys
    settings = Settings(_env_file=None, admin_token=ADMIN, namespace=namespace, mixed_batches=False,
                        ready_registry_grace_s=0,
                        batch_wait_ms=0.0, max_new_tokens=64)
    pristine = tiny_model(len(tokenizer))
    engine = Engine(settings, registry, model=tiny_model(len(tokenizer)), tokenizer=tokenizer)

    def upload(client: TestClient, name: str, seed: int):
        adapter = random_adapter(pristine, name, seed, density=0.1, std=0.5, mask_seed_step=1000, fingerprint=True)
        data = adapter_to_bytes(adapter)
        return client.post("/adapters", data={"name": name}, files={"file": ("a.safetensors", data)}, headers=AUTH)

    def post(client: TestClient, adapter: str | None = None):
        params = {"adapter": adapter} if adapter else {}
        return client.post("/generate", params=params, json={"prompt": PROMPT, "max_new_tokens": NEW})

    def keys() -> set[bytes]:
        return set(observer.scan_iter(match=f"{namespace}:*", count=1000))

    with TestClient(create_app(settings, engine=engine, registry=registry)) as client:
        assert wait_for(engine._listener.subscribed.is_set, 10)
        assert upload(client, "warm", 1).status_code == 201
        assert upload(client, "cold", 2).status_code == 201  # stored, never requested: not cached
        base = post(client).json()
        warm = post(client, "warm").json()
        assert warm["text"] != base["text"] and warm["adapters"][0]["version"] == 1
        stored = keys()
        observer.close()

        server.stop()
        started = time.monotonic()
        assert client.get("/health").json() == {"status": "ok"}
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "not_ready", "model": True, "registry": False}
        for spec in ("warm", "warm@1"):  # cached: served from memory, same text, same version
            during = post(client, spec)
            assert during.status_code == 200, during.text
            assert during.json()["text"] == warm["text"] and during.json()["adapters"] == warm["adapters"]
        assert post(client).json()["text"] == base["text"]
        address = f"127.0.0.1:{server.port}"  # in the server log only, never in an answer
        cold = post(client, "cold")
        assert_error(cold, 503, "registry_unavailable", "retry shortly")
        assert cold.headers["Retry-After"] == "1"
        refused = [cold, upload(client, "fresh", 3), client.get("/adapters"),
                   client.delete("/adapters/warm", headers=AUTH)]
        for response in refused:
            assert_error(response, 503, "registry_unavailable", "server log")
            assert address not in response.text and str(server.port) not in response.text
        assert time.monotonic() - started < 20  # every refusal was prompt, none waited out a long timeout

        server.restart()
        assert wait_for(lambda: client.get("/ready").status_code == 200, 15)
        observer = connect(server.current.url)
        assert keys() == stored  # the refused upload left nothing behind, not even pending chunks
        listing = client.get("/adapters").json()
        assert [(a["name"], a["version"]) for a in listing["adapters"]] == [("cold", 1), ("warm", 1)]
        recovered = post(client, "cold")
        assert recovered.status_code == 200 and recovered.json()["text"] not in (base["text"], warm["text"])
        fresh = upload(client, "fresh", 3)
        assert fresh.status_code == 201 and fresh.json()["version"] == 1, fresh.text
        assert post(client, "fresh").status_code == 200

        # The listener subscribed again: a delete made through another client reaches the engine's cache.
        assert wait_for(lambda: engine._listener.reconnects >= 1, 15)
        assert any(k[1] == "warm" for k in engine.cache.lru_keys() if k[0] == "adapter")
        other = RedisRegistry(observer, namespace=namespace)
        assert other.delete("warm") == [1]
        assert wait_for(lambda: not any("warm" in str(k) for k in engine.cache.lru_keys()), 10)
        assert_error(post(client, "warm"), 404, "adapter_not_found", "warm")
        observer.close()
    registry.client.close()
