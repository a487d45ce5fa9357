"""Two replicas of the service on one registry: changes made through one are served by the other at once.

Each replica is a FastAPI app with its own real Engine, its own tiny Llama (same seed, so the same weights
and fingerprint) and its own Redis connection, sharing one namespace of the real Redis. Grouped batches
(mixed_batches=False) keep greedy texts exactly comparable between the replicas.
"""

from __future__ import annotations

import contextlib
import copy
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from random_adapters import random_adapter
from support import tiny_model

from service.config import Settings
from service.embedded_redis import connect, free_port
from service.engine import Engine
from service.main import create_app
from service.registry import RedisRegistry
from shira_core.io import adapter_to_bytes

ADMIN = "replica-admin-" + "x" * 24
PROMPT = "The weather today is"
NEW = 8


@pytest.fixture(scope="module")
def pristine(tokenizer):
    """The replicas' base weights, never switched: adapters are built against these."""
    return tiny_model(len(tokenizer))


@dataclass
class Replica:
    client: TestClient
    engine: Engine
    registry: RedisRegistry
    pristine: torch.nn.Module

    def upload(self, name: str, seed: int) -> dict:
        adapter = random_adapter(self.pristine, name, seed, density=0.1, std=0.5, mask_seed_step=1000, fingerprint=True)
        data = adapter_to_bytes(adapter)
        r = self.client.post("/adapters", data={"name": name}, files={"file": ("a.safetensors", data)},
                             headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 201, r.text
        return r.json()

    def delete(self, name: str) -> dict:
        r = self.client.delete(f"/adapters/{name}", headers={"Authorization": f"Bearer {ADMIN}"})
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, adapter: str | None = None):
        params = {"adapter": adapter} if adapter else {}
        return self.client.post("/generate", params=params, json={"prompt": PROMPT, "max_new_tokens": NEW})

    def generate(self, adapter: str | None = None) -> dict:
        r = self.post(adapter)
        assert r.status_code == 200, r.text
        return r.json()

    def cached_names(self) -> set[str]:
        return {k[1] for k in self.engine.cache.lru_keys() if k[0] == "adapter"}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def make_replicas(tokenizer, pristine, redis_url, namespace) -> Iterator[Callable[..., tuple[Replica, Replica]]]:
    """make_replicas(b_hears_events=True, b_url=None) -> (a, b), both started; all stopped afterwards.

    With b_hears_events=False replica B subscribes to a channel nobody publishes on, as if every pub/sub
    message were lost: it then has only its per-request version checks. b_url: where B reaches Redis.
    """
    with ExitStack() as stack:

        def make(b_hears_events: bool = True, b_url: str | None = None) -> tuple[Replica, Replica]:
            replicas = []
            for label, tok in (("a", tokenizer), ("b", copy.deepcopy(tokenizer))):
                url = b_url if label == "b" and b_url else redis_url
                registry = RedisRegistry(connect(url, connect_timeout=0.5), namespace=namespace)
                stack.callback(registry.client.close)
                if label == "b" and not b_hears_events:
                    registry.channel = f"{namespace}:deaf"
                settings = Settings(_env_file=None, admin_token=ADMIN, redis_url=url, namespace=namespace,
                                    mixed_batches=False, batch_wait_ms=0.0, max_new_tokens=64)
                engine = Engine(settings, registry, model=tiny_model(len(tok)), tokenizer=tok)
                client = stack.enter_context(TestClient(create_app(settings, engine=engine, registry=registry)))
                assert wait_for(engine._listener.subscribed.is_set), f"replica {label} never subscribed"
                replicas.append(Replica(client, engine, registry, pristine))
            a, b = replicas
            assert a.engine.fingerprint.id == b.engine.fingerprint.id  # same weights: adapters fit both
            return a, b

        yield make


def assert_not_found(response, name: str) -> None:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "adapter_not_found" and name in error["message"]


@pytest.mark.parametrize("b_hears_events", [True, False], ids=["pubsub", "version-checks-only"])
def test_new_changed_and_deleted_adapters_reach_the_other_replica(make_replicas, b_hears_events):
    a, b = make_replicas(b_hears_events)
    base = b.generate()
    assert base["text"] == a.generate()["text"] and base["adapters"] == []

    first = a.upload("style", seed=1)
    on_a = a.generate("style")
    on_b = b.generate("style")  # B never saw this name before: no restart, no warm-up
    assert on_b["text"] == on_a["text"] != base["text"]
    assert on_b["adapters"] == [{"name": "style", "version": 1, "weight": 1.0}]
    assert "style" in b.cached_names()

    second = a.upload("style", seed=2)
    assert second["version"] == 2 and second["sha256"] != first["sha256"]
    new_on_b = b.generate("style")  # B holds version 1 decoded and planned; it must not serve it
    assert new_on_b["adapters"] == [{"name": "style", "version": 2, "weight": 1.0}]
    assert new_on_b["text"] == a.generate("style")["text"] != on_b["text"]
    pinned = b.generate("style@1")
    assert pinned["text"] == on_a["text"] and pinned["adapters"][0]["version"] == 1

    assert a.delete("style") == {"name": "style", "deleted_versions": [1, 2]}
    # At once, before any event could be relied on: B has both versions cached, and still answers 404.
    assert_not_found(b.post("style"), "style")
    assert_not_found(b.post("style@1"), "style")
    assert_not_found(b.post("style@2"), "style")
    assert b.generate()["text"] == base["text"]  # and the base it serves is the real base
    if b_hears_events:  # the delete event frees B's cached copies too
        assert wait_for(lambda: "style" not in b.cached_names(), 5.0), b.engine.cache.lru_keys()


@pytest.mark.parametrize("b_hears_events", [True, False], ids=["pubsub", "version-checks-only"])
def test_deleted_then_reuploaded_name_serves_the_new_content(make_replicas, b_hears_events):
    a, b = make_replicas(b_hears_events)
    base = b.generate()["text"]
    old = a.upload("tone", seed=1)
    old_text = b.generate("tone")["text"]
    assert old_text == a.generate("tone")["text"] != base

    a.delete("tone")
    new = a.upload("tone", seed=3)
    assert new["version"] == 2 and new["sha256"] != old["sha256"]  # a deleted name's versions are not reused
    new_on_a = a.generate("tone")["text"]
    assert new_on_a not in (old_text, base)
    for spec in ("tone", "tone@2"):
        served = b.generate(spec)
        assert served["text"] == new_on_a, f"{spec}: replica B served its stale copy of tone@1"
        assert served["adapters"] == [{"name": "tone", "version": 2, "weight": 1.0}]
    assert_not_found(b.post("tone@1"), "tone")  # B still holds tone@1's bytes; the deleted version stays gone
    shas = {k[3] for k in b.engine.cache.lru_keys() if k[0] == "adapter" and k[1] == "tone"}
    assert new["sha256"] in shas
    if b_hears_events:
        assert wait_for(lambda: old["sha256"] not in
                        {k[3] for k in b.engine.cache.lru_keys() if k[0] == "adapter"}, 5.0)


class Partition:
    """A TCP relay between one replica and Redis; cut() drops its connections and refuses new ones."""

    def __init__(self, redis_url: str) -> None:
        kw = connect(redis_url).connection_pool.connection_kwargs
        self.target = (kw["host"], kw["port"])
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/{kw.get('db', 0)}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listening = threading.Event()
        self._acceptor = threading.Thread()
        self.heal()

    def heal(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: the same port again
        server.settimeout(0.05)
        self._listening = listening = threading.Event()
        listening.set()
        self._acceptor = threading.Thread(target=self._accept, args=(server, listening), daemon=True)
        self._acceptor.start()

    def cut(self) -> None:
        self._listening.clear()
        self._acceptor.join()  # its socket is closed: new connections are refused from here on
        with self._lock:
            doomed, self._sockets = self._sockets, []
        for s in doomed:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, server: socket.socket, listening: threading.Event) -> None:
        with server:
            while listening.is_set():
                try:
                    client, _ = server.accept()
                except TimeoutError:
                    continue
                upstream = socket.create_connection(self.target)
                with self._lock:
                    self._sockets += [client, upstream]
                for src, dst in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def partition(redis_url) -> Iterator[Partition]:
    relay = Partition(redis_url)
    yield relay
    relay.cut()  # after the replicas using it have stopped


def test_events_missed_while_cut_off_are_made_up_for_on_reconnect(partition, make_replicas):
    """B misses a delete while partitioned; once its subscription is back it must forget the deleted copy,
    so that a later outage (where cached adapters are served from memory) cannot serve it."""
    a, b = make_replicas(b_url=partition.url)
    a.upload("gone", seed=1)
    a.upload("kept", seed=2)
    assert b.generate("gone")["adapters"][0]["version"] == 1
    kept = b.generate("kept")
    reconnects = b.engine._listener.reconnects

    partition.cut()
    a.delete("gone")  # B's subscription is down: this event never reaches it
    partition.heal()
    assert wait_for(lambda: b.engine._listener.reconnects > reconnects, 15), "B never resubscribed"
    assert wait_for(lambda: "gone" not in b.cached_names(), 5), f"B still holds {b.engine.cache.lru_keys()}"

    partition.cut()  # B is cut off again: from its side Redis is down
    assert b.post("gone").status_code == 503  # never the deleted copy
    during = b.post("kept")  # a cached adapter that still exists keeps working
    assert during.status_code == 200 and during.json()["text"] == kept["text"]
    partition.heal()
    assert wait_for(lambda: b.client.get("/ready").status_code == 200, 10)
    assert_not_found(b.post("gone"), "gone")


def scrape(client: TestClient) -> dict[tuple[str, tuple], float]:
    """Every sample of GET /metrics as {(sample name, sorted labels): value}."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_after_traffic(make_replicas):
    a, _ = make_replicas()
    a.upload("m1", seed=1)
    a.upload("m2", seed=2)
    before = scrape(a.client)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    # base (no switch) -> m1 (apply) -> m2 (transition) -> base (revert) -> m1 (apply, cached: hits)
    results = [a.generate(spec) for spec in (None, "m1", "m2", None, "m1")]
    assert_not_found(a.post("nope"), "nope")
    after = scrape(a.client)

    for kind in ("apply", "transition", "revert"):
        assert delta("shira_switch_seconds_count", kind=kind) >= 1, kind
        assert after[("shira_switch_seconds_sum", (("kind", kind),))] > 0
    assert delta("shira_switch_seconds_count", kind="apply") == 2
    assert after[("shira_adapter_cache_bytes", ())] > 0
    assert delta("shira_adapter_cache_misses_total") >= 4  # m1 and m2, each adapter and plan
    assert delta("shira_adapter_cache_hits_total") >= 2  # the second m1: adapter and plan
    assert after[("shira_process_resident_memory_bytes", ())] > 10 * 2**20
    assert delta("shira_requests_total", adapter="base", status="200") == 2
    assert delta("shira_requests_total", adapter="m1", status="200") == 2
    assert delta("shira_requests_total", adapter="m2", status="200") == 1
    assert delta("shira_requests_total", adapter="unresolved", status="404") == 1
    assert delta("shira_queue_seconds_count") == 5
    assert delta("shira_generate_seconds_count") == 5 and delta("shira_generate_seconds_sum") > 0
    assert delta("shira_generated_tokens_total") == sum(r["completion_tokens"] for r in results) > 0
    assert delta("shira_batch_size_count") == 5 and delta("shira_batch_size_sum") == 5
    active = [labels for (name, labels), value in after.items() if name == "shira_active_adapter_info"]
    assert active == [(("label", "m1@1:1"), ("nnz", str(a.engine.switcher.active.nnz)))]
    assert a.engine.switcher.active.nnz > 0
    assert any(name == "shira_switcher_bytes" and value > 0 for (name, _), value in after.items())
