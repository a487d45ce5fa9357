"""The Engine against the real Redis registry: a tiny random Llama for behaviour, the real model for equality."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis
import torch
from random_adapters import random_adapter
from support import TEST_REDIS_URL, hf_greedy, request, tiny_model, upload

from service import metrics
from service.config import Settings
from service.embedded_redis import connect
from service.engine import Engine
from service.errors import (
    AdapterNotFoundError,
    InvalidAdapterError,
    InvalidRequestError,
    MalformedUploadError,
    QueueFullError,
    RegistryUnavailableError,
)
from service.registry import RedisRegistry
from service.types import AdapterRef, AdapterSet, GenerationRequest, GenerationResult, SamplingParams
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.fusion import fuse_ties
from shira_core.io import adapter_to_bytes
from shira_core.models import linear_weight_names, load_base

# -- behaviour on a tiny model -----------------------------------------------------------------------


@pytest.fixture
def tiny(tokenizer, registry):
    """A started engine on a fresh tiny model with adapters a1, a2, a3 stored; stopped afterwards."""
    model = tiny_model(len(tokenizer))
    # Grouped batches: concurrent texts must equal isolated ones exactly, and a tiny random model's nearly
    # flat logits make greedy near-ties common (mixed batches round differently; see test_mixed_batches).
    settings = Settings(max_queue=64, batch_wait_ms=1.0, max_new_tokens=3000, mixed_batches=False)
    engine = Engine(settings, registry, model=model, tokenizer=tokenizer)
    engine.start()
    for seed, name in enumerate(["a1", "a2", "a3"], start=1):
        adapter = random_adapter(model, name, seed, density=0.1, std=0.5, mask_seed_step=1000, fingerprint=True)
        upload(registry, adapter, engine.fingerprint)
    yield engine
    engine.stop()


def test_mixed_concurrent_sets_equal_their_isolated_outputs(tiny):
    ids = [tiny.encode(prompt=p) for p in ("Hello there", "The weather today is quite")]
    sets = [(), ("a1",), ("a2",), ("a1", "a2"), ("a1", "a3")]
    merges = ["linear", "linear", "linear", "linear", "ties"]
    reqs = [request(i, *s, merge=m, weights=[0.7, 0.6][: len(s)] or None) for s, m in zip(sets, merges, strict=True)
            for i in ids]

    async def run():
        alone = [await tiny.generate(r) for r in reqs]
        together = await asyncio.gather(*(tiny.generate(r) for r in reqs * 2))
        return alone, together

    alone, together = asyncio.run(run())
    assert [r.text for r in together] == [r.text for r in alone] * 2
    assert len({r.text for r in alone}) == len(alone)  # every set really changes the output
    assert alone[2].adapters == [{"name": "a1", "version": 1, "weight": 0.7}]
    assert alone[0].adapters == [] and alone[0].completion_tokens == 8
    assert alone[2].timings.switch_ms > 0 and alone[0].timings.switch_ms == 0  # base -> a1 applied, reported
    assert tiny.status()["switches"]["transition"] >= 4


def test_deleted_and_unknown_adapters_are_refused_never_served_as_base(tiny, registry):
    ids = tiny.encode(prompt="Hello")

    async def run():
        await tiny.generate(request(ids, "a1"))
        assert tiny.cache.stats()["entries"] >= 2  # the adapter and its plan
        registry.delete("a1")
        for _ in range(100):  # the delete event drops the cached copies
            if not any("a1" in str(k) for k in tiny.cache.lru_keys()):
                break
            await asyncio.sleep(0.05)
        with pytest.raises(AdapterNotFoundError, match="a1"):
            await tiny.generate(request(ids, "a1"))
        with pytest.raises(AdapterNotFoundError, match="nope"):
            await tiny.resolve(AdapterSet((AdapterRef("nope"),)))
        with pytest.raises(AdapterNotFoundError, match="version 7"):
            pinned = AdapterSet((AdapterRef("a2", 7),))
            await tiny.generate(GenerationRequest(ids, SamplingParams(max_new_tokens=2), pinned))

    asyncio.run(run())
    assert not any("a1" in str(k) for k in tiny.cache.lru_keys())


def test_a_request_handed_its_resolved_set_reads_no_record_again(tiny, monkeypatch):
    # Each registry read wakes a thread, and on a small CPU that thread preempts a decoding torch thread.
    ids = tiny.encode(prompt="Hello")
    params = SamplingParams(max_new_tokens=4)
    reads = []
    record = tiny.registry.record
    monkeypatch.setattr(tiny.registry, "record", lambda name, version=None: reads.append((name, version))
                        or record(name, version))

    async def run():
        rset = await tiny.resolve_set(AdapterSet((AdapterRef("a1"), AdapterRef("a2", None, 0.5))))
        await tiny.generate(GenerationRequest(ids, params, rset.pinned, resolved=rset))  # loads the adapters
        reads.clear()
        handed = await tiny.generate(GenerationRequest(ids, params, rset.pinned, resolved=rset))
        handed_reads = list(reads)
        reads.clear()
        plain = await tiny.generate(GenerationRequest(ids, params, rset.pinned))
        plain_reads = list(reads)
        reads.clear()
        # A resolved set that is not the request's own is ignored, never served in its place.
        other = await tiny.generate(GenerationRequest(ids, params, AdapterSet((AdapterRef("a3"),)), resolved=rset))
        return handed, handed_reads, plain, plain_reads, other, list(reads)

    handed, handed_reads, plain, plain_reads, other, other_reads = asyncio.run(run())
    assert handed_reads == []
    assert plain_reads == [("a1", 1), ("a2", 1)]
    assert handed.text == plain.text and handed.adapters == plain.adapters
    assert other_reads[0] == ("a3", None) and other.adapters == [{"name": "a3", "version": 1, "weight": 1.0}]


def test_cached_adapters_keep_working_while_redis_is_down(tiny):
    ids = tiny.encode(prompt="Hello")

    async def run():
        before = await tiny.generate(request(ids, "a1"))
        pinned = await tiny.resolve(AdapterSet((AdapterRef("a1"),)))
        dead = RedisRegistry(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2), namespace="x")
        tiny.registry = tiny.cache.registry = dead
        after = await tiny.generate(request(ids, "a1"))
        with pytest.raises(RegistryUnavailableError):
            await tiny.generate(request(ids, "a2"))  # never loaded: nothing to fall back on
        return before, pinned, after

    before, pinned, after = asyncio.run(run())
    assert pinned.refs[0].version == 1
    assert after.text == before.text and after.adapters == before.adapters


def test_closing_a_stream_takes_the_request_out_of_its_batch(tiny):
    ids = tiny.encode(prompt="Once upon a time")
    counter = metrics.GENERATED_TOKENS._value

    async def run():
        alone = await tiny.generate(request(ids, "a2", n=120))
        start = counter.get()
        # A long stream, so that a close the loaded event loop gets to late still stops it far from its end:
        # with 120 tokens the worker could finish it before the close arrived.
        closing = tiny.stream(request(ids, "a2", n=2000))
        keep = asyncio.ensure_future(tiny.generate(request(ids, "a2", n=120)))
        pieces = [await closing.__anext__() for _ in range(3)]
        await closing.aclose()
        result = await keep
        return alone, pieces, result, counter.get() - start

    alone, pieces, result, produced = asyncio.run(run())
    assert all(isinstance(p, str) for p in pieces)
    assert result.text == alone.text and result.completion_tokens == 120
    assert produced < 1000  # the kept request's 120, and the closed stream stopped long before its 2000


def test_stream_yields_deltas_then_one_result(tiny):
    ids = tiny.encode(messages=[{"role": "user", "content": "Say something"}])

    async def run():
        items = [item async for item in tiny.stream(request(ids, "a3", n=10))]
        return items, await tiny.generate(request(ids, "a3", n=10))

    items, plain = asyncio.run(run())
    assert isinstance(items[-1], GenerationResult) and all(isinstance(i, str) for i in items[:-1])
    assert "".join(items[:-1]) == items[-1].text == plain.text


def test_queue_limit(tiny):
    ids = tiny.encode(prompt="Hello")
    tiny.scheduler.max_queue = 8

    async def run():
        busy = tiny.stream(request(ids, n=3000))  # base; keeps the worker busy until closed
        await busy.__anext__()
        waiting = [asyncio.ensure_future(tiny.generate(request(ids, "a1", n=2))) for _ in range(8)]
        for _ in range(500):
            if tiny.scheduler.depth == 8:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match="limit 8"):
            await tiny.generate(request(ids, "a1", n=2))
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        assert tiny.scheduler.depth == 0  # cancelled requests leave the queue
        await busy.aclose()

    asyncio.run(run())


def test_request_validation(tiny):
    with pytest.raises(InvalidRequestError, match="exactly one"):
        tiny.encode(prompt="a", messages=[{"role": "user", "content": "b"}])
    with pytest.raises(InvalidRequestError, match="limit is 2048"):
        tiny.encode(prompt="word " * 3000)
    bad = [
        (GenerationRequest([1], SamplingParams(max_new_tokens=0)), "max_new_tokens"),
        (GenerationRequest([1], SamplingParams(top_p=0.0)), "top_p"),
        (GenerationRequest([1], SamplingParams(), AdapterSet((AdapterRef("a1"),), "avg")), "unknown merge"),
        (GenerationRequest([1], SamplingParams(), AdapterSet((AdapterRef("a1"), AdapterRef("a1")))), "twice"),
    ]
    for req, message in bad:
        with pytest.raises(InvalidRequestError, match=message):
            asyncio.run(tiny.generate(req))


def test_validate_upload_maps_core_errors(tiny, tokenizer):
    good = random_adapter(tiny.model, "up", 5, density=0.05, std=0.1, mask_seed_step=1000, fingerprint=True)
    assert tiny.validate_upload(adapter_to_bytes(good), "renamed").name == "renamed"
    with pytest.raises(MalformedUploadError, match="'up'"):
        tiny.validate_upload(b"not safetensors at all", "up")
    other = tiny_model(len(tokenizer))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(3.0)
    foreign = random_adapter(other, "foreign", 5, density=0.05, std=0.1, mask_seed_step=1000, fingerprint=True)
    with pytest.raises(InvalidAdapterError, match="built for base"):
        tiny.validate_upload(adapter_to_bytes(foreign), "foreign")
    layer = linear_weight_names(tiny.model)[0]
    values = torch.tensor([0.1, float("nan")])
    nan = SparseAdapter("nan", {layer: SparseDelta(layer, (32, 32), torch.tensor([1, 2]), values)})
    with pytest.raises(InvalidAdapterError, match="nan|NaN|finite"):
        tiny.validate_upload(adapter_to_bytes(nan), "nan")
    wrong = SparseAdapter("shape", {layer: SparseDelta(layer, (16, 8), torch.tensor([1]), torch.tensor([0.1]))})
    with pytest.raises(InvalidAdapterError, match="shape"):
        tiny.validate_upload(adapter_to_bytes(wrong), "shape")


# -- the real bundled model ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(data_dir):
    model, tok, source = load_base(None, "cpu", "float32", data_dir / "models")
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    client = connect(TEST_REDIS_URL)
    ns = f"test-{uuid.uuid4().hex[:12]}"
    registry = RedisRegistry(client, namespace=ns)
    engine = Engine(Settings(batch_wait_ms=2.0), registry, model=model, tokenizer=tok, model_label=source.label)
    engine.start()
    yield engine, registry, snapshot
    engine.stop()
    keys = list(client.scan_iter(match=f"{ns}:*", count=1000))
    if keys:
        client.delete(*keys)


@pytest.mark.integration
def test_real_model_matches_shira_core_and_restores_the_base(real):
    engine, registry, snapshot = real
    adapters = {name: random_adapter(engine.model, name, seed, density=0.01, std=0.02, mask_seed_step=1000,
                                     fingerprint=True)
                for seed, name in enumerate(["r1", "r2", "r3"], start=1)}
    for adapter in adapters.values():
        upload(registry, adapter, engine.fingerprint)
    prompts = [engine.encode(prompt="The capital of France is"),
               engine.encode(messages=[{"role": "user", "content": "Name three colours."}])]
    sets = [(("r1",), "linear", None), (("r2",), "linear", None), (("r3",), "linear", None),
            (("r1", "r2"), "ties", [0.6, 0.6]), ((), "linear", None)]
    n = 12
    reqs = [request(ids, *names, n=n, merge=m, weights=w) for names, m, w in sets for ids in prompts]

    async def run():
        return await asyncio.gather(*(engine.generate(r) for r in reqs))

    results = asyncio.run(run())
    engine.stop()  # the worker is idle now; drive the same weights by hand with shira_core

    switcher = engine.switcher
    expected = []
    for names, merge, weights in sets:
        items = [(adapters[x], w) for x, w in zip(names, weights or [1.0] * len(names), strict=True)]
        if not items:
            switcher.revert()
        elif merge == "ties":
            switcher.apply(switcher.prepare([(fuse_ties(items), 1.0)]))
        else:
            switcher.apply(switcher.prepare(items))
        expected += [hf_greedy(engine.model, engine.tokenizer, ids, n) for ids in prompts]
    switcher.revert()
    assert [r.text for r in results] == expected
    base = expected[-2:]
    assert any(expected[i : i + 2] != base for i in range(0, 8, 2))  # the adapters do change the output
    state = engine.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())
    engine.start()  # leave it running for the module fixture's stop
