"""The OpenAPI document against the live app: schemathesis generates requests from /openapi.json.

A real Engine on a tiny random Llama with the real tokenizer, the real Redis registry, two stored adapters and
small limits, served by uvicorn. Every operation gets schema-valid (positive) and schema-violating (negative)
requests, with a fixed seed and a bounded number of examples. No answer may be a 5xx, and every answer must
match what the document says: its status code, content type and body schema. When this fails, fix the schema
to say the truth or fix the server; never loosen the server's validation to match the schema.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import schemathesis
from api_double import ServerThread
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from random_adapters import random_adapter
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from support import tiny_model, upload

from service.config import Settings
from service.engine import Engine
from service.main import create_app

ADMIN = "schema-admin-" + "x" * 24
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 20}
AIMED_EXAMPLES = 40
# Random names are almost never stored adapters, so the aimed pass swaps in sets that exist: the 200 answers
# (JSON and server-sent events) get checked too, not only the refusals.
MODELS = ["base", "a1", "a2@1", "a1:0.6+a2:0.4", "a1:0.5+a2:0.5[ties]"]
QUERIES = [{}, {"adapter": "a1"}, {"adapter": "a2@1"}, {"adapters": "a1:0.6,a2:0.4", "merge": "ties"}]
NAMES = ["a1", "a2@1", "a1@1"]


def aimed(case, choice: int):
    """The generated case with its adapter set (or path name) replaced by one that is stored; every other
    generation streams."""
    if isinstance(case.body, dict) and case.operation.method.upper() == "POST":
        case.body["stream"] = choice % 2 == 0
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODELS[choice % len(MODELS)]
    elif case.operation.path == "/generate":
        case.query = {k: v for k, v in (case.query or {}).items() if k not in ("adapter", "adapters")}
        case.query.update(QUERIES[choice % len(QUERIES)])
        if isinstance(case.body, dict):
            case.body.pop("adapters", None)
    elif case.operation.path == "/adapters/{name}":
        case.path_parameters = {"name": NAMES[choice % len(NAMES)]}
    return case


@pytest.fixture
def live(tokenizer, registry):
    """The base URL of a served app with adapters a1 and a2 stored; stopped afterwards."""
    model = tiny_model(len(tokenizer))
    limits = Settings(_env_file=None, admin_token=ADMIN, max_new_tokens=4, default_max_new_tokens=4,
                      max_prompt_tokens=64, max_upload_bytes=2**20, max_adapters_per_request=3, batch_wait_ms=1.0)
    engine = Engine(limits, registry, model=model, tokenizer=tokenizer)
    app = create_app(limits, engine=engine, registry=registry)
    with ServerThread(app) as server:  # its lifespan starts the engine
        for seed, name in enumerate(["a1", "a2"], start=1):
            adapter = random_adapter(model, name, seed, density=0.05, std=0.1, mask_seed_step=1000, fingerprint=True)
            upload(registry, adapter, engine.fingerprint)
        yield server.url


def test_every_operation_answers_as_its_schema_says_and_never_5xx(live):
    url = live
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    auth = {"Authorization": f"Bearer {ADMIN}"}
    statuses: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    failures: list[str] = []
    started = time.monotonic()

    def exercise(operation, mode: GenerationMode, examples: int, aim: bool = False) -> None:
        strategy = operation.as_strategy(generation_mode=mode)
        if aim:
            strategy = st.builds(aimed, strategy, st.integers(0, 59))

        @given(case=strategy)
        @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def one(case) -> None:
            response = case.call(base_url=url, headers=auth, timeout=60)
            statuses[response.status_code] += 1
            kinds[(response.headers.get("content-type") or [""])[0].split(";")[0]] += 1
            try:
                case.validate_response(response, checks=CHECKS, headers=auth)
            except FailureGroup as group:
                failures.append(f"{mode.value} {operation.label}: {group}")

        try:
            one()
        except Unsatisfiable:  # no request can violate a schema without parameters (GET /health)
            assert mode is GenerationMode.NEGATIVE, operation.label

    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode, examples in EXAMPLES.items():
            exercise(operation, mode, examples)
        if operation.method.upper() != "DELETE" and (
            operation.path in ("/generate", "/adapters/{name}") or operation.path.startswith("/v1/c")
        ):
            exercise(operation, GenerationMode.POSITIVE, AIMED_EXAMPLES, aim=True)

    total, server_errors = sum(statuses.values()), sum(n for s, n in statuses.items() if s >= 500)
    streams = kinds["text/event-stream"]
    print(f"\nschemathesis: {len(operations)} operations, {total} requests, {server_errors} 5xx, {streams} streams, "
          f"checks {', '.join(c.__name__ for c in CHECKS)}, {time.monotonic() - started:.0f} s; "
          f"statuses {dict(sorted(statuses.items()))}")
    assert not failures, f"{len(failures)} failing cases:\n" + "\n".join(failures[:10])
    assert server_errors == 0
    assert total >= len(operations) * 2
    assert statuses[200] > total // 5 and streams > 0  # the aimed pass reached the answers, streams included
