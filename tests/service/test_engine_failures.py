"""One tenant never hurts another: requests that fail inside the engine fail alone, with a clear status, and
their batchmates finish with the texts they get in isolation (the real model, the real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import pytest
import torch
from random_adapters import random_adapter
from support import TEST_REDIS_URL, request, tiny_model, upload

from service.config import Settings
from service.embedded_redis import connect
from service.engine import Engine
from service.errors import GenerationFailedError, InvalidAdapterError
from service.mixed_batches import MixedBatches
from service.registry import RedisRegistry
from service.types import GenerationRequest, SamplingParams
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.fingerprint import BaseFingerprint
from shira_core.io import adapter_to_bytes
from shira_core.models import load_base

N = 10
WAIT_S = 60  # a request that is never answered fails here instead of hanging the suite


@pytest.fixture(scope="module")
def real(data_dir):
    """The real model with mixed batches on, three adapters stored, and each request's text in isolation."""
    model, tok, _ = load_base(None, "cpu", "float32", data_dir / "models")
    client = connect(TEST_REDIS_URL)
    registry = RedisRegistry(client, namespace=f"test-{uuid.uuid4().hex[:12]}")
    engine = Engine(Settings(batch_wait_ms=50.0, mixed_batches=True), registry, model=model, tokenizer=tok)
    engine.start()
    for i in range(3):
        adapter = random_adapter(model, f"m{i}", i + 1, density=0.01, std=0.02, mask_seed_step=1000, fingerprint=True)
        upload(registry, adapter, engine.fingerprint)
    prompts = {"capital": engine.encode(prompt="The capital of France is"),
               "colours": engine.encode(messages=[{"role": "user", "content": "Name three colours."}]),
               # runs past 32 tokens with or without an adapter: a batch that is still decoding when others join
               "story": engine.encode(messages=[{"role": "user", "content": "Write a long story about a lighthouse "
                                                 "keeper who finds a message in a bottle."}])}
    yield engine, registry, prompts
    engine.stop()
    for key in client.scan_iter(match=f"{registry.namespace}:*"):
        client.delete(key)


def alone(engine: Engine, reqs: list[GenerationRequest]) -> list[str]:
    """Each request's text when it runs by itself on the same engine."""
    async def run():
        return [(await asyncio.wait_for(engine.generate(r), WAIT_S)).text for r in reqs]

    return asyncio.run(run())


def together(engine: Engine, reqs: list[GenerationRequest], delays: list[float] | None = None) -> list:
    """Runs the requests concurrently (each after its delay); results or the exceptions they raised."""
    async def one(r: GenerationRequest, delay: float):
        await asyncio.sleep(delay)
        return await asyncio.wait_for(engine.generate(r), WAIT_S)

    async def run():
        return await asyncio.gather(*(one(r, d) for r, d in zip(reqs, delays or [0.0] * len(reqs), strict=True)),
                                    return_exceptions=True)

    return asyncio.run(run())


def sampled(ids: list[int], temperature: float, top_p: float) -> GenerationRequest:
    return GenerationRequest(ids, SamplingParams(max_new_tokens=N, temperature=temperature, top_p=top_p, seed=3))


def test_extreme_sampling_settings_do_not_fail_their_batchmates(real):
    """Defect 1: top_p=1e-300 (or a temperature of 1e-39) underflowed in fp32 and failed the whole batch."""
    engine, _, prompts = real
    ids = prompts["capital"]
    others = [request(ids, "m0", n=N), request(prompts["colours"], n=N)]
    extreme = [sampled(ids, 1.0, 1e-300), sampled(ids, 1.0, 5e-324), sampled(ids, 1e-39, 1.0)]
    expected = alone(engine, others)
    greedy = alone(engine, [request(ids, n=N)])[0]
    results = together(engine, [*others, *extreme])
    assert [r.text for r in results[:2]] == expected
    assert [r.text for r in results[2:]] == [greedy] * 3  # only the most likely token survives such settings


@contextlib.contextmanager
def failing(monkeypatch, phase: str, key: tuple, after_tokens: int = 0):
    """Makes MixedBatches' prefill or decode pass raise whenever it holds a row of set `key`. Yields the list of
    the passes it saw: (the rows' set keys, the keys of the rows already running, for prefills)."""
    original = getattr(MixedBatches, phase)
    seen: list[tuple[list, list]] = []

    def patched(self, rows, *args):
        seen.append(([r.set_key for r in rows], [r.set_key for r in (args[0] if args else ())]))
        if any(r.set_key == key and len(r.tokens) >= after_tokens for r in rows):
            raise RuntimeError(f"injected {phase} failure")
        return original(self, rows, *args)

    monkeypatch.setattr(MixedBatches, phase, patched)
    yield seen
    monkeypatch.setattr(MixedBatches, phase, original)


def key_of(engine: Engine, name: str) -> tuple:
    return asyncio.run(engine.resolve_set(request([1], name).adapters)).key


def test_a_row_that_fails_mid_batch_fails_alone(real, monkeypatch):
    engine, _, prompts = real
    reqs = [request(prompts["capital"], "m0", n=N), request(prompts["capital"], "m1", n=N),
            request(prompts["colours"], "m2", n=N), request(prompts["colours"], n=N)]
    expected = alone(engine, reqs)
    with failing(monkeypatch, "decode", key_of(engine, "m1"), after_tokens=3):
        results = together(engine, reqs)
    assert isinstance(results[1], GenerationFailedError) and results[1].status == 500
    assert "m1" in results[1].message
    assert [r.text for i, r in enumerate(results) if i != 1] == [t for i, t in enumerate(expected) if i != 1]


def test_a_joiner_that_fails_leaves_the_running_batch_alone(real, monkeypatch):
    engine, _, prompts = real
    running = [request(prompts["story"], "m0", n=32), request(prompts["story"], n=32)]
    joiners = [request(prompts["capital"], "m1", n=N), request(prompts["colours"], "m2", n=N)]
    expected = alone(engine, running + joiners)
    m2 = key_of(engine, "m2")

    async def streamed(r: GenerationRequest, decoding: asyncio.Event):
        async for item in engine.stream(r):
            if isinstance(item, str) and item:
                decoding.set()  # the batch is decoding: the joiners arrive now
            result = item
        return result

    async def run():
        decoding = asyncio.Event()
        first = [asyncio.ensure_future(streamed(r, decoding)) for r in running]
        await asyncio.wait_for(decoding.wait(), WAIT_S)
        late = [asyncio.ensure_future(engine.generate(r)) for r in joiners]
        return await asyncio.wait_for(asyncio.gather(*first, *late, return_exceptions=True), WAIT_S)

    with failing(monkeypatch, "prefill", key_of(engine, "m1")) as passes:
        results = asyncio.run(run())
    # m2 was prefilled beside rows that were already decoding: it joined the running batch.
    assert any(m2 in rows and running_keys for rows, running_keys in passes), passes
    assert [r.completion_tokens for r in results[:2]] == [32, 32]  # the running rows decoded throughout
    assert isinstance(results[2], GenerationFailedError)
    assert [results[i].text for i in (0, 1, 3)] == [expected[i] for i in (0, 1, 3)]


def store_unchecked(registry: RedisRegistry, adapter: SparseAdapter, fingerprint: BaseFingerprint):
    """Stores an adapter without the upload's checks, like one stored before those checks existed."""
    info = {"nnz": adapter.nnz, "density": adapter.density, "layers": len(adapter), "base_fingerprint": fingerprint.id}
    return registry.put(adapter.name, adapter_to_bytes(adapter), info)


def unservable(model) -> list[SparseAdapter]:
    """Defect 2: a delta on a 1-D weight (not switched), and values that overflow once weighted."""
    norm = "model.layers.0.input_layernorm.weight"
    width = model.config.hidden_size
    layer = "model.layers.0.mlp.up_proj.weight"
    shape = tuple(dict(model.named_parameters())[layer].shape)
    return [
        SparseAdapter("norm", {norm: SparseDelta(norm, (width,), torch.tensor([0, 5]), torch.tensor([0.1, 0.2]))}),
        SparseAdapter("huge", {layer: SparseDelta(layer, shape, torch.tensor([3, 9]), torch.tensor([1e38, -1e38]))}),
    ]


@pytest.mark.parametrize("early_check", [True, False], ids=["at-submit", "in-the-worker"])
def test_sets_that_cannot_be_served_get_a_422_and_others_go_on(real, monkeypatch, early_check):
    engine, registry, prompts = real
    for adapter in unservable(engine.model):
        store_unchecked(registry, adapter, engine.fingerprint)
    if not early_check:  # the worker's own guard, for sets that get past the check at submit
        async def unchecked(self, rset):
            return None

        monkeypatch.setattr(Engine, "_check_servable", unchecked)
    good = [request(prompts["capital"], "m0", n=N), request(prompts["colours"], n=N)]
    expected = alone(engine, good)
    bad = [request(prompts["capital"], "norm", n=N), request(prompts["capital"], "huge", "m0", n=N, weights=[10, 1])]
    results = together(engine, [good[0], *bad, good[1]])
    assert [results[0].text, results[3].text] == expected
    for error, layer in zip(results[1:3], ["input_layernorm", "up_proj"], strict=True):
        assert isinstance(error, InvalidAdapterError) and error.status == 422, error
        assert layer in error.message
    # The worker is still serving.
    assert alone(engine, good[:1]) == expected[:1]


def test_a_batch_that_raises_answers_every_request_and_the_worker_goes_on(real, monkeypatch):
    engine, _, prompts = real
    # A fresh worker: a batch an earlier test left decoding would take these requests as joiners, and no new
    # batch (the one that raises) would start.
    engine.stop()
    engine.start()
    worker = engine._worker
    calls = []

    def breaking(original):
        # Whichever path takes the batch (mixed rows, or one set: the sets an earlier test left in the engine
        # decide), its first batch raises.
        def broken(*args):
            pendings = args[-1]
            calls.append(len(pendings))
            if len(calls) == 1:
                raise RuntimeError("injected batch failure")
            return original(*args)

        return broken

    monkeypatch.setattr(worker, "_serve_mixed", breaking(worker._serve_mixed))
    monkeypatch.setattr(worker, "_serve", breaking(worker._serve))
    reqs = [request(prompts["capital"], "m0", n=4), request(prompts["capital"], "m1", n=4)]
    results = together(engine, reqs)
    failed = [r for r in results if isinstance(r, GenerationFailedError)]
    assert len(failed) == calls[0] >= 1  # every request of the broken batch got its error, the others their text
    assert all(not isinstance(r, BaseException) for r in results if r not in failed)
    assert engine.ready()
    assert alone(engine, reqs[:1])[0]


def test_unservable_set_without_mixed_batches_is_a_422(tokenizer, registry):
    """Defect 2 with SHIRA_MIXED_BATCHES=false: the set's failure was a bare 500."""
    model = tiny_model(len(tokenizer))
    engine = Engine(Settings(mixed_batches=False), registry, model=model, tokenizer=tokenizer)
    engine.start()
    try:
        for adapter in unservable(model):
            store_unchecked(registry, adapter, engine.fingerprint)
        adapter = random_adapter(model, "ok", 1, density=0.1, std=0.5, mask_seed_step=1000, fingerprint=True)
        upload(registry, adapter, engine.fingerprint)
        ids = engine.encode(prompt="Hello")
        results = together(engine, [request(ids, "norm"), request(ids, "huge", weights=[10]), request(ids, "ok")])
        assert [type(r) for r in results[:2]] == [InvalidAdapterError] * 2
        assert results[2].completion_tokens == 8
    finally:
        engine.stop()
