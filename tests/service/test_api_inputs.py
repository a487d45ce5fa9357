"""The HTTP layer's input handling: names and versions, empty adapter sets, bounds, metric labels, pending chunks.

Every adapter name a client sends (upload form, /adapters/{name}, ?adapter, ?adapters, body adapters, the
OpenAI `model`) goes through one check, so a name refused in one place is refused in all of them.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from api_double import EchoEngine, tiny_adapter
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from service import validation
from service.config import Settings
from service.main import create_app
from shira_core import metadata
from shira_core.io import adapter_to_bytes

ADMIN = "admin-token-" + "x" * 20
LIMIT = 16 * 1024


@pytest.fixture
def tiny(tiny_llama) -> torch.nn.Module:
    return tiny_llama(seed=0)


@pytest.fixture
def client(tiny, registry):
    settings = Settings(_env_file=None, admin_token=ADMIN, max_upload_bytes=LIMIT, max_new_tokens=32,
                        max_adapters_per_request=3)
    with TestClient(create_app(settings, engine=EchoEngine(tiny, registry), registry=registry),
                    raise_server_exceptions=False) as test_client:
        yield test_client


def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def upload(client: TestClient, name: str, data: bytes, **form: str):
    return client.post("/adapters", headers=admin(), data={"name": name, **form},
                       files={"file": ("a.safetensors", data)})


def assert_error(response, status: int, code: str, *words: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error["message"]


def generate(client: TestClient, **params: str):
    return client.post("/generate", params=params, json={"prompt": "hi"})


def complete(client: TestClient, model: str):
    return client.post("/v1/completions", json={"model": model, "prompt": "hi"})


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_name_with_a_trailing_newline_is_refused_everywhere(client, tiny, ns_keys):
    before = ns_keys()
    # re.match with "$" also matched before a final "\n": the name was stored, then the Location header failed
    assert_error(upload(client, "evil\n", adapter_to_bytes(tiny_adapter(tiny, "evil"))), 400, "invalid_request",
                 "adapter name")
    assert ns_keys() == before
    assert upload(client, "evil", adapter_to_bytes(tiny_adapter(tiny, "evil"))).status_code == 201
    # "evil\n" is not the name "evil": refused, not served as that adapter
    assert_error(generate(client, adapter="evil\n"), 400, "invalid_request", "adapter name")
    assert_error(generate(client, adapters="evil\n:0.5"), 400, "invalid_request", "adapter name")
    assert_error(complete(client, "evil\n"), 400, "invalid_request", "adapter name")
    body = {"prompt": "hi", "adapters": [{"name": "evil\n", "weight": 1.0}]}
    assert_error(client.post("/generate", json=body), 400, "invalid_request", "adapter name")
    assert_error(client.get("/adapters/evil%0A"), 400, "invalid_request", "adapter name")
    assert_error(client.delete("/adapters/evil%0A", headers=admin()), 400, "invalid_request", "adapter name")
    assert generate(client, adapter="evil").status_code == 200
    assert generate(client, adapters=" evil:0.5 ").status_code == 200  # spaces around set items are fine


@pytest.mark.parametrize("version", ["²", "١", "0", "-1", "2147483648", "1" * 5000, "", "1.0", " 1"])
def test_versions_are_ascii_digits_in_range_everywhere(client, tiny, version):
    assert upload(client, "a", adapter_to_bytes(tiny_adapter(tiny, "a"))).status_code == 201
    spec = f"a@{version}"
    # "²".isdigit() is True but int("²") raises, and int() of 5,000 digits raises too: both were 500s
    for response in (client.get(f"/adapters/{spec}"), generate(client, adapter=spec),
                     generate(client, adapters=f"{spec}:0.5"), complete(client, spec),
                     client.post("/generate", json={"prompt": "hi", "adapters": [{"name": spec}]})):
        assert_error(response, 400, "invalid_request", "version", "2147483647")
    assert client.get("/adapters/a@2147483647").status_code == 404
    assert client.get("/adapters/a@1").status_code == 200


def test_weights_are_ascii_numbers(client, tiny):
    assert upload(client, "a", adapter_to_bytes(tiny_adapter(tiny, "a"))).status_code == 201
    for weight in ("٣", "1_0", "nan", "inf", "0x1"):
        assert_error(generate(client, adapters=f"a:{weight}"), 400, "invalid_request", "weight")
    assert generate(client, adapters="a:.5").json()["adapters"][0]["weight"] == 0.5


def test_an_adapter_set_given_but_empty_is_a_422_not_the_base_model(client, tiny):
    assert upload(client, "a", adapter_to_bytes(tiny_adapter(tiny, "a"))).status_code == 201
    for params in ({"adapters": ",,,,"}, {"adapters": ""}, {"adapters": " , "}, {"adapter": ""},
                   {"adapter": " "}):
        assert_error(generate(client, **params), 422, "validation_error", "adapter")
    for model in ("", " ", "+", " + + ", "[ties]", "+[ties]"):
        assert_error(complete(client, model), 422, "validation_error", "model")
    chat = {"model": "+", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=chat), 422, "validation_error", "model")
    # the base model is asked for by leaving the set out, or by name
    assert generate(client).json()["adapters"] == []
    assert client.post("/generate", json={"prompt": "hi", "adapters": []}).json()["adapters"] == []
    for model in ("base", EchoEngine.model_label):
        assert complete(client, model).json()["choices"][0]["text"].startswith("base|")
    assert generate(client, adapters="a:0.5,,").json()["adapters"][0]["name"] == "a"


def test_a_huge_list_offset_is_a_422_not_registry_unavailable(client):
    assert_error(client.get("/adapters", params={"offset": 9223372036854775806}), 422, "validation_error", "offset")
    assert_error(client.get("/adapters", params={"offset": 2**31}), 422, "validation_error", "offset")
    last = client.get("/adapters", params={"offset": 2**31 - 1})
    assert last.status_code == 200 and last.json()["adapters"] == []


def raw_request(app, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict]:
    """Sends header bytes as they are (HTTP clients re-encode them), straight to the ASGI app."""

    async def run() -> tuple[int, dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 1), "server": ("testserver", 80)}
        await app(scope, receive, send)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return sent[0]["status"], json.loads(body)

    return asyncio.run(run())


def test_a_content_length_of_non_ascii_digits_is_a_400_not_a_500(client):
    auth = [(b"authorization", f"Bearer {ADMIN}".encode()), (b"content-type", b"multipart/form-data; boundary=x")]
    # latin-1 b"\xb2" is "²", which str.isdigit() accepts and int() refuses
    status, body = raw_request(client.app, "POST", "/adapters", [*auth, (b"content-length", b"\xb2")])
    assert (status, body["error"]["code"]) == (400, "malformed_upload"), body
    assert "Content-Length" in body["error"]["message"]
    # int() of 5,000 digits raises too
    status, body = raw_request(client.app, "POST", "/adapters", [*auth, (b"content-length", b"9" * 5000)])
    assert (status, body["error"]["code"]) == (413, "payload_too_large"), body
    status, body = raw_request(client.app, "POST", "/generate", [(b"content-length", b"9" * 5000)])
    assert (status, body["error"]["code"]) == (413, "payload_too_large"), body


def test_a_description_over_the_limit_is_a_422_naming_it(client, tiny, ns_keys):
    before = ns_keys()
    data = adapter_to_bytes(tiny_adapter(tiny, "described"))
    assert_error(upload(client, "described", data, description="d" * 4097), 422, "validation_error", "4,096")
    assert ns_keys() == before
    stored = upload(client, "described", data, description="d" * 4096)
    assert stored.status_code == 201 and stored.json()["description"] == "d" * 4096
    # the form's limit is the parsers' limit on the description inside a file (kept apart: no torch import)
    assert validation.MAX_DESCRIPTION_CHARS == metadata.MAX_DESCRIPTION_CHARS


def test_tiny_temperatures_are_refused_with_the_minimum(client):
    for temperature in (1e-300, 0.005):
        assert_error(client.post("/generate", json={"prompt": "hi", "temperature": temperature}), 422,
                     "validation_error", "0.01")
        response = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "temperature": temperature})
        assert_error(response, 422, "validation_error", "0.01")
    assert client.post("/generate", json={"prompt": "hi", "temperature": 0.01}).status_code == 200


def test_request_metric_labels_are_bounded_and_each_adapter_is_counted(client, tiny):
    for name, seed in (("ma", 0), ("mb", 1)):
        assert upload(client, name, adapter_to_bytes(tiny_adapter(tiny, name, seed=seed))).status_code == 201
    before = {n: sample("shira_adapter_requests_total", adapter=n) for n in ("ma", "mb")}
    sets_before = sample("shira_requests_total", adapter="set", status="200")
    assert generate(client, adapter="ma").status_code == 200
    assert generate(client, adapters="ma:0.6,mb:0.4").status_code == 200
    assert generate(client, adapters="mb:0.1,ma:0.9", merge="ties").status_code == 200
    assert complete(client, "ma@1:0.5+mb").status_code == 200
    assert sample("shira_requests_total", adapter="set", status="200") == sets_before + 3
    assert sample("shira_adapter_requests_total", adapter="ma") == before["ma"] + 4
    assert sample("shira_adapter_requests_total", adapter="mb") == before["mb"] + 3
    text = client.get("/metrics").text
    assert 'shira_requests_total{adapter="ma",status="200"}' in text
    labels = {line.split('adapter="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("shira_requests_total{")}
    assert not any("+" in label or ":" in label or "@" in label for label in labels), labels


def test_metrics_count_chunks_left_by_uploads_that_never_committed(client, registry):
    client.get("/metrics")
    assert sample("shira_registry_pending_chunks") == 0
    registry.write_pending("crashed-upload", b"x" * 5000)  # what a server killed before the commit leaves
    text = client.get("/metrics").text
    assert "shira_registry_pending_chunks 1.0" in text and "shira_registry_pending_bytes 5000.0" in text
