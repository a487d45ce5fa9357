"""deploy/local-cluster.sh as a user runs it: three `shira serve` replicas sharing the test Redis, behind the
gateway (deploy/gateway) on Debian's nginx. Requests for one adapter land on one replica, whichever way they
name it; when that replica dies, another one serves them.

Which replica served what is read from each replica's own /metrics (shira_adapter_requests_total).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from random_adapters import random_adapter
from server_support import ADMIN, DEVICE, REDIS_URL, attention_weights

from service.embedded_redis import connect
from shira_core.io import adapter_to_bytes

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "local-cluster.sh"
REPLICAS = 3
ADAPTER = "cluster-affinity"
NEW = 2  # tokens per request: the test is about where requests land, not what they say


def nginx_ready() -> bool:
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    return binary is not None and Path("/usr/lib/nginx/modules/ngx_http_js_module.so").exists()


def free_port_block(count: int) -> int:
    """A port P with P..P+count-1 all free on loopback."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} free consecutive loopback ports")


class Cluster:
    def __init__(self, state: Path, port: int, env: dict[str, str]) -> None:
        self.state, self.env = state, env
        self.gateway = f"http://127.0.0.1:{port}"
        self.replicas = [f"http://127.0.0.1:{port + i}" for i in range(1, REPLICAS + 1)]

    def script(self, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(SCRIPT), command], env=self.env, capture_output=True, text=True, timeout=timeout)

    def served(self, name: str) -> list[float]:
        """Each replica's count of requests that named `name`."""
        pattern = re.compile(rf'^shira_adapter_requests_total\{{adapter="{re.escape(name)}"\}} (\S+)$', re.M)
        counts = []
        for url in self.replicas:
            try:
                found = pattern.search(httpx.get(url + "/metrics", timeout=10).text)
            except httpx.TransportError:  # a replica the test killed
                found = None
            counts.append(float(found.group(1)) if found else 0.0)
        return counts

    def landed(self, name: str, send) -> list[float]:
        """How many of the requests `send()` makes each replica served."""
        before = self.served(name)
        send()
        return [after - was for after, was in zip(self.served(name), before, strict=True)]

    def generate(self, url: str, **query) -> dict:
        body = {"prompt": "The capital of France is", "max_new_tokens": NEW}
        body.update(query.pop("body", {}))
        r = httpx.post(url + "/generate", params=query, json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, data_dir):
    if not nginx_ready():
        pytest.fail("needs Debian's nginx and libnginx-mod-http-js: `make test` installs them (`make nginx-test`)")
    namespace = f"test-cluster-{uuid.uuid4().hex[:12]}"
    cache = REPO / "data" / "models"  # `make install` converts the model there; else the session's copy
    port = free_port_block(REPLICAS + 1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIRA_")}
    env.update(
        CLUSTER_DIR=str(tmp_path_factory.mktemp("cluster")), CLUSTER_PORT=str(port),
        SHIRA_REPLICAS=str(REPLICAS), SHIRA_REDIS_URL=REDIS_URL, SHIRA_NAMESPACE=namespace, SHIRA_ADMIN_TOKEN=ADMIN,
        SHIRA_DEVICE=DEVICE, SHIRA_DTYPE="float32",
        SHIRA_MODEL_CACHE_DIR=str(cache if cache.is_dir() else data_dir / "models"),
    )
    running = Cluster(Path(env["CLUSTER_DIR"]), port, env)
    try:
        started = running.script("up")
        assert started.returncode == 0, started.stdout + started.stderr
        yield running
    finally:
        stopped = running.script("down", timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        registry = connect(REDIS_URL)
        keys = list(registry.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            registry.delete(*keys)


@pytest.fixture(scope="module")
def adapter(cluster):
    """The test adapter, uploaded through the gateway."""
    from shira_core.models import load_base

    model, _, _ = load_base(None, "cpu", "float32", cluster.env["SHIRA_MODEL_CACHE_DIR"])
    built = random_adapter(model, ADAPTER, 7, attention_weights(model), density=0.004, std=0.08, pool=1.0)
    files = {"file": ("a.safetensors", adapter_to_bytes(built))}
    r = httpx.post(cluster.gateway + "/adapters", data={"name": ADAPTER}, files=files,
                   headers={"Authorization": f"Bearer {ADMIN}"}, timeout=120)
    assert r.status_code == 201, r.text
    return ADAPTER


def test_requests_for_one_adapter_land_on_one_replica(cluster, adapter):
    names = set()
    for url in cluster.replicas:
        found = re.search(r'^shira_replica_info\{replica="([^"]+)"\} 1\.0$', httpx.get(url + "/metrics").text, re.M)
        names.add(found.group(1))
    assert len(names) == REPLICAS, names  # each replica says which one it is

    # Every replica serves the adapter (one registry), and greedy decoding gives the same text everywhere.
    texts = {cluster.generate(url, adapter=adapter)["text"] for url in cluster.replicas}
    assert len(texts) == 1

    spellings = [{"adapter": adapter}, {"adapter": f"{adapter}@1"}, {"adapters": f"{adapter}:1.0"},
                 {"body": {"adapters": [{"name": adapter, "weight": 1.0}]}}]

    def twenty() -> None:
        with ThreadPoolExecutor(4) as pool:  # concurrent, so least connections would have spread them
            list(pool.map(lambda i: cluster.generate(cluster.gateway, **spellings[i % 4]), range(20)))

    landed = cluster.landed(adapter, twenty)
    assert sorted(landed) == [0, 0, 20], landed
    owner = landed.index(20)

    import openai

    client = openai.OpenAI(base_url=cluster.gateway + "/v1", api_key=ADMIN)
    messages = [{"role": "user", "content": "Name a colour."}]

    def chat() -> None:
        answer = client.chat.completions.create(model=adapter, messages=messages, max_tokens=NEW, temperature=0)
        assert answer.choices[0].message.content is not None

    assert cluster.landed(adapter, chat)[owner] == 1  # the OpenAI body's model goes to the same replica

    base = cluster.generate(cluster.gateway)
    assert base["adapters"] == []
    streamed = httpx.post(cluster.gateway + "/generate", json={"prompt": "Hi", "max_new_tokens": NEW, "stream": True},
                          timeout=120)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.rstrip().endswith("data: [DONE]")


def test_another_replica_takes_over_when_the_owner_dies(cluster, adapter):
    owner = cluster.landed(adapter, lambda: cluster.generate(cluster.gateway, adapter=adapter)).index(1)
    pid = int((cluster.state / f"replica-{owner + 1}" / "pid").read_text())
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)

    def six() -> None:
        for _ in range(6):
            assert cluster.generate(cluster.gateway, adapter=adapter)["adapters"][0]["name"] == adapter

    landed = cluster.landed(adapter, six)
    assert landed[owner] == 0 and sorted(landed) == [0, 0, 6], landed  # the next replica on the ring, alone
    assert cluster.generate(cluster.gateway)["adapters"] == []
    status = cluster.script("status")
    assert status.returncode == 1 and f"replica-{owner + 1}: port" in status.stdout and "stopped" in status.stdout
