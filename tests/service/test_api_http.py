"""HTTP-layer behaviour with an engine double and the real Redis registry: auth, names, limits, wire formats.

The model-backed behaviour (same text as shira_core in-process, PEFT parity, fusion, concurrency, bit-exact
base) is tested against the real Engine in tests/integration/test_server.py.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
import torch
from api_double import EchoEngine, tiny_adapter
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from shira_core.io import adapter_to_bytes

ADMIN = "admin-token-" + "x" * 20
READER = "read-token-" + "y" * 20
LIMIT = 16 * 1024


@pytest.fixture
def tiny(tiny_llama) -> torch.nn.Module:
    return tiny_llama(seed=0)


def make_client(tiny, registry, **overrides) -> tuple[TestClient, EchoEngine]:
    settings = Settings(
        _env_file=None, admin_token=ADMIN, max_upload_bytes=LIMIT, max_new_tokens=32, max_adapters_per_request=3,
        **overrides,
    )
    engine = EchoEngine(tiny, registry)
    return TestClient(create_app(settings, engine=engine, registry=registry)), engine


@pytest.fixture
def client(tiny, registry):
    test_client, _ = make_client(tiny, registry)
    with test_client:
        yield test_client


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def upload(client: TestClient, name: str, data: bytes, headers: dict | None = None, **params):
    return client.post("/adapters", params=params, headers=admin() if headers is None else headers,
                       data={"name": name}, files={"file": ("a.safetensors", data)})


def assert_error(response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    for word in words:
        assert word in error["message"], error["message"]


def test_upload_list_get_delete_round_trip(client, tiny, registry):
    data = adapter_to_bytes(tiny_adapter(tiny, "qa"))
    first = upload(client, "qa", data)
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1 and first.json()["created_version"] is True
    again = upload(client, "qa", data)  # identical bytes: no new version
    assert again.status_code == 200 and again.json()["version"] == 1 and again.json()["created_version"] is False
    second = upload(client, "qa", adapter_to_bytes(tiny_adapter(tiny, "qa", seed=1)))
    assert second.status_code == 201 and second.json()["version"] == 2
    assert_error(upload(client, "qa", data, if_absent="true"), 409, "adapter_conflict", "qa")

    listing = client.get("/adapters", params={"offset": 0, "limit": 10}).json()
    assert listing["total"] == 1 and [a["version"] for a in listing["adapters"]] == [2]
    detail = client.get("/adapters/qa@1").json()
    assert detail["version"] == 1 and [v["version"] for v in detail["versions"]] == [1, 2]
    assert detail["sha256"] == first.json()["sha256"]
    assert client.get("/v1/models").json()["data"][1]["id"] == "qa"

    assert client.delete("/adapters/qa").status_code == 401
    deleted = client.delete("/adapters/qa", headers=admin())
    assert deleted.json() == {"name": "qa", "deleted_versions": [1, 2]}
    assert_error(client.get("/adapters/qa"), 404, "adapter_not_found", "qa")
    assert_error(client.delete("/adapters/qa", headers=admin()), 404, "adapter_not_found")


@pytest.mark.parametrize(
    ("headers", "name", "status", "code"),
    [
        ({}, "ok", 401, "unauthorized"),
        ({"Authorization": "Bearer " + "z" * 30}, "ok", 403, "forbidden"),
        ({"Authorization": f"Basic {ADMIN}"}, "ok", 401, "unauthorized"),
        (None, "Bad Name", 400, "invalid_request"),
        (None, "../../etc/passwd", 400, "invalid_request"),
        (None, "base", 400, "invalid_request"),
        (None, "a" * 65, 400, "invalid_request"),
    ],
)
def test_refused_uploads_leave_registry_unchanged(client, tiny, ns_keys, headers, name, status, code):
    before = ns_keys()
    response = upload(client, name, adapter_to_bytes(tiny_adapter(tiny)), headers=headers)
    assert_error(response, status, code)
    assert ns_keys() == before


def test_bad_adapter_bytes_are_4xx_and_named(client, tiny, ns_keys, tiny_llama):
    good = tiny_adapter(tiny)
    delta = next(iter(good))
    before = ns_keys()
    assert_error(upload(client, "x", b"\x00" * 100), 400, "malformed_upload")
    nan = tiny_adapter(tiny)
    next(iter(nan)).values[3] = float("nan")
    assert_error(upload(client, "x", adapter_to_bytes(nan)), 422, "invalid_adapter", delta.name)
    other = tiny_adapter(tiny_llama(seed=1))  # same shapes, other weights
    assert_error(upload(client, "x", adapter_to_bytes(other)), 422, "invalid_adapter", "built for base")
    assert ns_keys() == before


def test_upload_size_limit_by_header_and_while_streaming(client, ns_keys):
    before = ns_keys()
    big = b"\x01" * (LIMIT + 1)
    assert_error(upload(client, "big", big), 413, "payload_too_large", f"{LIMIT:,}")
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nbig\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n").encode()
    body += big + f"\r\n--{boundary}--\r\n".encode()

    def chunked():  # no Content-Length: the limit must trip while reading
        for i in range(0, len(body), 4096):
            yield body[i : i + 4096]

    response = client.post("/adapters", content=chunked(),
                           headers={**admin(), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert_error(response, 413, "payload_too_large")
    assert ns_keys() == before


def test_upload_form_shape_errors(client, tiny):
    data = adapter_to_bytes(tiny_adapter(tiny))
    assert_error(client.post("/adapters", headers=admin(), json={"name": "x"}), 400, "malformed_upload", "multipart")
    assert_error(client.post("/adapters", headers=admin(), files={"file": ("a", data)}), 400, "malformed_upload",
                 "'name'")
    only_name = {"name": (None, "x")}  # multipart with no file part
    assert_error(client.post("/adapters", headers=admin(), files=only_name), 400, "malformed_upload", "no adapter")
    assert_error(client.post("/adapters", headers=admin(), data={"name": "x"}), 400, "malformed_upload", "multipart")
    both = {"file": ("a", data), "adapter_model": ("b", data)}
    assert_error(client.post("/adapters", headers=admin(), data={"name": "x"}, files=both), 400, "malformed_upload",
                 "not both")


def test_read_token_guards_reads_and_generation(tiny, registry):
    test_client, _ = make_client(tiny, registry, read_token=READER)
    with test_client as client:
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 200
        for method, path, body in [("GET", "/adapters", None), ("GET", "/v1/models", None), ("GET", "/metrics", None),
                                   ("POST", "/generate", {"prompt": "hi"})]:
            assert_error(client.request(method, path, json=body), 401, "unauthorized")
            wrong = client.request(method, path, json=body, headers={"Authorization": "Bearer " + "w" * 24})
            assert_error(wrong, 403, "forbidden")
            for token in (READER, ADMIN):
                ok = client.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
                assert ok.status_code == 200, (path, ok.text)
        reader = {"Authorization": f"Bearer {READER}"}
        assert_error(client.delete("/adapters/x", headers=reader), 403, "forbidden")


def test_generate_validation_is_422_with_the_field_named(client):
    cases = [
        ({"prompt": "hi", "max_new_tokens": 33}, "max_new_tokens", "32"),
        ({"prompt": "hi", "temperature": -1}, "temperature", ""),
        ({"prompt": "hi", "top_p": 0}, "top_p", ""),
        ({"prompt": "hi", "messages": [{"role": "user", "content": "x"}]}, "exactly one", ""),
        ({"max_new_tokens": 3}, "exactly one", ""),
        ({"prompt": "hi", "unknown_field": 1}, "unknown_field", ""),
    ]
    for body, *words in cases:
        assert_error(client.post("/generate", json=body), 422, "validation_error", *[w for w in words if w])
    assert_error(client.post("/generate", content=b"{not json", headers={"Content-Type": "application/json"}),
                 422, "validation_error")
    assert_error(client.post("/generate", json={"prompt": "x" * 65}), 400, "invalid_request", "limit")
    too_many = "a:1,b:1,c:1,d:1"
    assert_error(client.post("/generate", params={"adapters": too_many}, json={"prompt": "hi"}), 422,
                 "validation_error", "limit is 3")
    assert_error(client.post("/generate", params={"adapters": "a:x"}, json={"prompt": "hi"}), 400, "invalid_request",
                 "not a number")
    assert_error(client.post("/generate", content=b"x" * (9 * 2**20), headers={"Content-Type": "application/json"}),
                 413, "payload_too_large")


def test_generate_routes_adapter_sets_and_404s(client, tiny):
    for name, seed in (("a", 0), ("b", 1)):
        assert upload(client, name, adapter_to_bytes(tiny_adapter(tiny, name, seed=seed))).status_code == 201
    base = client.post("/generate", json={"prompt": "hello"}).json()
    assert base["text"] == "base|5" and base["adapters"] == []
    one = client.post("/generate", params={"adapter": "a"}, json={"prompt": "hello"}).json()
    assert one["adapters"] == [{"name": "a", "version": 1, "weight": 1.0}]
    fused = client.post("/generate", params={"adapters": "a:0.6,b@1:0.4", "merge": "ties"},
                        json={"prompt": "hi"}).json()
    assert fused["text"] == "a@1:0.6+b@1:0.4[ties]|2" and fused["merge"] == "ties"
    in_body = client.post("/generate", json={"prompt": "hi", "adapters": [{"name": "a", "weight": 0.6},
                                                                         {"name": "b", "weight": 0.4}]}).json()
    assert in_body["text"] == "a@1:0.6+b@1:0.4|2"
    assert_error(client.post("/generate", params={"adapter": "nope"}, json={"prompt": "hi"}), 404,
                 "adapter_not_found", "nope")
    assert_error(client.post("/generate", params={"adapters": "a:1,nope:1"}, json={"prompt": "hi"}), 404,
                 "adapter_not_found", "nope")
    assert_error(client.post("/generate", params={"adapter": "a@7"}, json={"prompt": "hi"}), 404, "adapter_not_found")
    assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404, "adapter_not_found")
    metrics = client.get("/metrics").text
    assert 'shira_requests_total{adapter="a",status="200"}' in metrics
    assert 'shira_requests_total{adapter="unresolved",status="404"}' in metrics


def test_combination_is_peft_s_word_and_merge_still_works(client, tiny):
    for name, seed in (("a", 0), ("b", 1)):
        assert upload(client, name, adapter_to_bytes(tiny_adapter(tiny, name, seed=seed))).status_code == 201
    pair = {"adapters": "a:0.6,b:0.4"}
    ways = [({"combination": "ties"}, {}), ({"merge": "ties"}, {}), ({}, {"combination": "ties"}),
            ({}, {"merge": "ties"}), ({"combination": "ties"}, {"merge": "ties"})]
    answers = [client.post("/generate", params={**pair, **query}, json={"prompt": "hi", **body}).json()
               for query, body in ways]
    assert {a["text"] for a in answers} == {"a@1:0.6+b@1:0.4[ties]|2"}
    assert all(a["combination"] == a["merge"] == "ties" for a in answers)
    assert_error(client.post("/generate", params={**pair, "combination": "ties", "merge": "linear"},
                             json={"prompt": "hi"}), 400, "invalid_request", "twice")
    assert_error(client.post("/generate", params={**pair, "combination": "dare"}, json={"prompt": "hi"}), 422,
                 "validation_error", "combination")


def sse_events(text: str) -> list:
    out = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_streaming_wire_formats(client, tiny):
    assert upload(client, "a", adapter_to_bytes(tiny_adapter(tiny, "a"))).status_code == 201
    with client.stream("POST", "/generate", params={"adapter": "a"}, json={"prompt": "hey", "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.read().decode())
    assert [e["text"] for e in events[:-2]] == ["a@1:1", "|", "3"]
    assert events[-2]["type"] == "result" and events[-2]["text"] == "a@1:1|3" and events[-1] == "[DONE]"

    body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "yo"}],
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = sse_events(r.read().decode())
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1] if c["choices"])
    assert text.startswith("a@1:1|")
    assert chunks[-3]["choices"][0]["finish_reason"] == "length"
    assert chunks[-2]["usage"]["completion_tokens"] == 3 and chunks[-1] == "[DONE]"
    # an unknown adapter is still a plain 404, not a 200 stream carrying an error
    assert_error(client.post("/v1/completions", json={"model": "zz", "prompt": "x", "stream": True}), 404,
                 "adapter_not_found")


def test_openai_client_against_the_app(client, tiny):
    import openai

    assert upload(client, "a", adapter_to_bytes(tiny_adapter(tiny, "a"))).status_code == 201
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    assert [m.id for m in oai.models.list()] == ["base", "a"]
    done = oai.completions.create(model="a:0.5", prompt="hello", max_tokens=5, temperature=0)
    assert done.choices[0].text == "a@1:0.5|5" and done.usage.prompt_tokens == 5
    chat = oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.content.startswith("base|")
    pieces = [c.choices[0].delta.content or "" for c in oai.chat.completions.create(
        model="a", messages=[{"role": "user", "content": "hi"}], stream=True) if c.choices]
    assert "".join(pieces).startswith("a@1:1|")
    with pytest.raises(openai.NotFoundError, match="nope"):
        oai.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        oai.completions.create(model="a", prompt="x", max_tokens=1000)


def test_unreachable_registry_is_503_and_unexpected_errors_are_500(tiny, registry, caplog):
    from service.embedded_redis import connect
    from service.registry import RedisRegistry

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        dead_url = f"redis://127.0.0.1:{port}/0"
    dead = RedisRegistry(connect(dead_url, connect_timeout=0.5), namespace="nowhere")
    test_client, engine = make_client(tiny, dead, ready_registry_grace_s=0)
    with test_client as client, caplog.at_level(logging.WARNING, logger="service.registry"):
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json() == {"status": "not_ready", "model": True, "registry": False}
        listing = client.get("/adapters")
        assert_error(listing, 503, "registry_unavailable", "retry shortly", "server log")
        assert listing.headers["Retry-After"] == "1"
        refused = [listing, client.post("/generate", params={"adapter": "a"}, json={"prompt": "hi"}),
                   client.get("/adapters/a"), client.delete("/adapters/a", headers=admin())]
        for response in refused:  # the address is for the operator's log, never for clients
            assert response.status_code == 503, response.text
            assert not any(word in response.text for word in ("127.0.0.1", str(port), "redis://")), response.text
        assert dead_url in caplog.text and "ConnectionError" in caplog.text

    test_client, engine = make_client(tiny, registry)

    async def broken(request):
        raise RuntimeError("secret internals")

    engine.generate = broken
    with TestClient(test_client.app, raise_server_exceptions=False) as client:
        response = client.post("/generate", json={"prompt": "hi"})
        assert_error(response, 500, "internal_error")
        assert "secret" not in response.text
        assert 'shira_requests_total{adapter="base",status="500"}' in client.get("/metrics").text


def test_model_load_and_upload_checks_run_on_threads_that_exit(tiny, registry):
    # A torch thread that outlives its call keeps an OpenMP pool alive and slows the engine worker
    # (service.torch_thread); loading and upload checks must run on threads that are gone afterwards.
    seen: list[threading.Thread] = []

    class Recording(EchoEngine):
        def start(self) -> None:
            seen.append(threading.current_thread())
            super().start()

        def validate_upload(self, data: bytes, name: str):
            seen.append(threading.current_thread())
            return super().validate_upload(data, name)

    settings = Settings(_env_file=None, admin_token=ADMIN, max_upload_bytes=LIMIT)
    with TestClient(create_app(settings, engine=Recording(tiny, registry), registry=registry)) as test_client:
        assert upload(test_client, "threads", adapter_to_bytes(tiny_adapter(tiny, "threads"))).status_code == 201
    assert len(seen) == 2
    for thread in seen:
        assert thread is not threading.main_thread()
        thread.join(5)
        assert not thread.is_alive(), thread.name


def test_readiness_outlasts_a_brief_registry_outage_then_drops(tiny):
    """The base model and cached adapters keep serving while Redis is away, so a shared outage must not take
    every replica out of rotation at once; a replica cut off for longer than the grace leaves it."""
    from service.embedded_redis import connect
    from service.registry import RedisRegistry

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = RedisRegistry(connect(f"redis://127.0.0.1:{port}/0", connect_timeout=0.2), namespace="nowhere")
    test_client, _ = make_client(tiny, dead, ready_registry_grace_s=1.0)
    with test_client as client:
        ready = client.get("/ready")
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "model": True, "registry": False}
        assert client.post("/generate", json={"prompt": "hi"}).status_code == 200  # the base model serves
        time.sleep(1.1)
        late = client.get("/ready")
        assert late.status_code == 503 and late.json() == {"status": "not_ready", "model": True, "registry": False}
