"""Mixed-set batches in the engine: rows of several adapter sets decode together in one batch."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import pytest
import torch
from prometheus_client import REGISTRY
from random_adapters import random_adapter
from support import TEST_REDIS_URL, hf_greedy, request, tiny_model, upload  # noqa: F401

from service import metrics
from service.config import Settings
from service.embedded_redis import connect
from service.engine import Engine
from service.registry import RedisRegistry
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.fingerprint import BaseFingerprint
from shira_core.models import load_base


@pytest.fixture(params=["native"])
def tiny_mixed(request, tokenizer, registry):  # noqa: F811 - the module fixture imported above
    """An engine on a tiny model with three uploaded adapters; the native kernel unless a test asks for
    PyTorch's products (`@pytest.mark.parametrize("tiny_mixed", ["torch"], indirect=True)`)."""
    model = tiny_model(len(tokenizer))
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    settings = Settings(max_queue=64, batch_wait_ms=20.0, mixed_batches=True, correction_kernel=request.param)
    engine = Engine(settings, registry, model=model, tokenizer=tokenizer)
    engine.start()
    for seed, name in enumerate(["a1", "a2", "a3"], start=1):
        adapter = random_adapter(model, name, seed, density=0.1, std=0.5, mask_seed_step=1000, fingerprint=True)
        upload(registry, adapter, engine.fingerprint)
    yield engine, snapshot
    engine.stop()


def test_rows_of_many_sets_share_one_batch_and_the_base_is_restored(tiny_mixed):
    engine, snapshot = tiny_mixed
    ids = engine.encode(prompt="Hello there")
    sets = [(), ("a1",), ("a2",), ("a3",), ("a1", "a2"), ("a1",)]

    def count(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    async def run():
        first = await engine.generate(request(ids, "a1", n=2))  # plans and deltas of a1 cached, a1 applied
        batches = engine.status()["batches"]
        results = await asyncio.gather(*(engine.generate(request(ids, *s, n=6)) for s in sets))
        return first, results, engine.status()["batches"] - batches

    steps = count("shira_step_seconds_count", kind="decode"), count("shira_step_seconds_count", kind="prefill")
    builds = count("shira_guest_plan_build_seconds_count")
    first, results, batches = asyncio.run(run())
    # The worker's phases reach /metrics: at least 5 more decode steps (6 tokens: the first comes from the
    # prefill), the prefills, and the plan builds of the mixed batch.
    assert count("shira_step_seconds_count", kind="decode") >= steps[0] + 5
    assert count("shira_step_seconds_count", kind="prefill") >= steps[1] + 2
    assert count("shira_guest_plan_build_seconds_count") > builds
    assert first.timings.switch_ms > 0  # the switch of the merged set inside a mixed batch is reported to its rows
    assert batches <= 2  # one mixed batch (a late arrival may start a second), not one per set
    assert [[a["name"] for a in r.adapters] for r in results] == [list(s) for s in sets]
    assert all(r.completion_tokens == 6 for r in results)
    engine.stop()
    engine.switcher.revert()
    state = engine.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())
    engine.start()


def test_a_set_that_cannot_mix_runs_in_a_batch_of_its_own(tiny_mixed, registry):
    engine, _ = tiny_mixed
    name = "model.embed_tokens.weight"
    shape = tuple(engine.model.model.embed_tokens.weight.shape)
    deltas = {name: SparseDelta(name, shape, torch.tensor([5, 900]), torch.tensor([0.3, -0.3]))}
    emb = SparseAdapter("emb", deltas, "rand", BaseFingerprint.of(engine.model).to_dict(deltas))
    upload(registry, emb, engine.fingerprint)
    ids = engine.encode(prompt="Hello")

    async def run():
        alone = await engine.generate(request(ids, "emb", n=5))
        together = await asyncio.gather(*(engine.generate(request(ids, *s, n=5)) for s in [("emb",), ("a1",), ()]))
        return alone, together

    alone, together = asyncio.run(run())
    assert together[0].text == alone.text  # grouped path: bit-identical to running it alone
    assert any("emb" in str(k) for k in engine._worker.mixed._refused)


@pytest.mark.parametrize("tiny_mixed", ["torch"], indirect=True)  # native plans copy no deltas
def test_the_decode_plan_stays_within_its_byte_budget_and_rows_past_it_wait(tiny_mixed):
    engine, snapshot = tiny_mixed
    mixed = engine._worker.mixed
    ids = engine.encode(prompt="Hello there")
    sets = [("a1",), ("a2",), ("a3",), ()] * 3

    async def run():
        return await asyncio.gather(*(engine.generate(request(ids, *s, n=6)) for s in sets))

    free = asyncio.run(run())
    unbounded = mixed.peak_plan_bytes
    assert unbounded > 0
    budget = unbounded // 2
    mixed.plan_bytes, mixed.peak_plan_bytes = budget, 0
    bounded = asyncio.run(run())
    assert 0 < mixed.peak_plan_bytes <= budget  # corrected rows still mixed, never past the budget
    assert [r.completion_tokens for r in bounded] == [6] * len(sets)
    assert [[a["name"] for a in r.adapters] for r in bounded] == [list(s) for s in sets]
    assert len({r.text for r in free}) > 1
    assert metrics.CORRECTION_PLAN_BYTES._value.get() == 0  # released with the batch
    engine.stop()
    engine.switcher.revert()
    assert all(torch.equal(engine.model.state_dict()[k], v) for k, v in snapshot.items())
    engine.start()


@pytest.mark.parametrize("tiny_mixed", ["torch"], indirect=True)  # native plans copy no deltas
def test_a_zero_plan_budget_makes_the_sets_take_turns(tiny_mixed):
    engine, _ = tiny_mixed
    engine._worker.mixed.plan_bytes = 0
    ids = engine.encode(prompt="Hi")

    async def run():
        return await asyncio.gather(*(engine.generate(request(ids, *s, n=4)) for s in [("a1",), ("a2",), ()] * 2))

    switches = engine._worker.mixed.merged_switches
    results = asyncio.run(run())
    assert engine._worker.mixed.peak_plan_bytes == 0  # no step decoded rows of two sets
    assert engine._worker.mixed.merged_switches - switches >= 2  # the sets took turns instead
    assert [r.completion_tokens for r in results] == [4] * 6


# -- the real bundled model ----------------------------------------------------------------------------


@pytest.mark.integration
def test_real_model_mixed_batch_texts_equal_isolated_runs(data_dir):
    model, tok, source = load_base(None, "cpu", "float32", data_dir / "models")
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    client = connect(TEST_REDIS_URL)
    registry = RedisRegistry(client, namespace=f"test-{uuid.uuid4().hex[:12]}")
    engine = Engine(Settings(batch_wait_ms=50.0, mixed_batches=True), registry, model=model, tokenizer=tok)
    engine.start()
    try:
        adapters = {f"m{i}": random_adapter(model, f"m{i}", i + 1, density=0.01, std=0.02, mask_seed_step=1000,
                                            fingerprint=True) for i in range(3)}
        for adapter in adapters.values():
            upload(registry, adapter, engine.fingerprint)
        prompts = [engine.encode(prompt="The capital of France is"),
                   engine.encode(messages=[{"role": "user", "content": "Name three colours."}])]
        sets = [("m0",), ("m1",), ("m2",), ("m0",), ()]
        n = 12
        reqs = [request(ids, *s, n=n) for s in sets for ids in prompts]

        async def run():
            return await asyncio.gather(*(engine.generate(r) for r in reqs))

        results = asyncio.run(run())
        assert engine.status()["batches"] <= 2 and engine._worker.mixed.merged_switches <= 2
    finally:
        engine.stop()
        for key in client.scan_iter(match=f"{registry.namespace}:*"):
            client.delete(key)
    switcher = engine.switcher
    expected = []
    for s in sets:
        if s:
            switcher.apply(switcher.prepare([(adapters[s[0]], 1.0)]))
        else:
            switcher.revert()
        expected += [hf_greedy(model, tok, ids, n) for ids in prompts]
    switcher.revert()
    assert [r.text for r in results] == expected
    assert len(set(expected)) > 2  # the sets do change the output
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
def test_the_host_is_the_base_unless_its_set_holds_a_clear_majority(tokenizer, native):  # noqa: F811
    from service.batch_generation import Row
    from service.mixed_batches import MixedBatches
    from service.types import SamplingParams
    from shira_core.batched import PackedDelta, RowCorrector
    from shira_core.switcher import Switcher

    model = tiny_model(len(tokenizer))
    switcher = Switcher(model)
    merged = SimpleNamespace(key="A")
    active = ActiveKey(merged)
    mixed = MixedBatches(RowCorrector(model, switcher, native=native), merged, dense_params=10**9)
    assert mixed.corrector.native == native
    keys = ["A", "B", "C", "D", "E", "F", "G"]
    assert all(mixed.add(k, None, PackedDelta(k, {}, 1000)) for k in keys)

    def rows(own: int) -> list:
        sets = ["A"] * own + keys[1 : 1 + 8 - own]
        return [Row([1], SamplingParams(max_new_tokens=32), set_key=k) for k in sets]

    if native:
        # A delta costs the same for one row as for eight: under the base, A's rows carry one term; under A, the
        # others carry A's negated delta, one term too. Equal, so the set in the weights stays.
        for own in (2, 4, 6):
            assert mixed.choose_merged(rows(own)) == "A"
        active[0] = ()
        for own in (2, 4, 6):
            assert mixed.choose_merged(rows(own)) == ()
        # Past eight rows a delta runs once per eight: A on 12 of 16 rows costs two passes under the base, and
        # A's negated delta one pass for the other four, so merging A pays.
        many = [Row([1], SamplingParams(max_new_tokens=32), set_key=k) for k in ["A"] * 12 + keys[1:5]]
        assert mixed.choose_merged(many) == "A"
        return
    # Half the rows on the merged set: each other row would carry two deltas (8 entries-worth at the slower
    # two-term rate) against one each (8) under the base, so the base wins even after paying the switch.
    assert mixed.choose_merged(rows(4)) == ()
    assert mixed.choose_merged(rows(6)) == "A"  # 2 corrected rows x 2 deltas: cheaper than 8 rows x 1
    active[0] = ()
    assert mixed.choose_merged(rows(4)) == ()
    assert mixed.choose_merged(rows(8)) == "A"


class ActiveKey:
    """`active[0] = key` sets the merged set's key, as the callback-based test wrote it."""

    def __init__(self, merged: SimpleNamespace) -> None:
        self.merged = merged

    def __setitem__(self, index: int, key) -> None:
        self.merged.key = key


def test_a_fresh_batch_is_prefilled_under_the_host_its_steps_choose(tiny_mixed):
    engine, _ = tiny_mixed
    mixed = engine._worker.mixed
    ids = engine.encode(prompt="Hello there")
    depths: list[int] = []
    plan_for = mixed.corrector.prefill_plan

    def spy(terms, *args):
        depths.append(max(len(t) for t in terms))
        return plan_for(terms, *args)

    mixed.corrector.prefill_plan = spy

    async def run():
        await engine.generate(request(ids, "a1", n=2))  # leaves a1 in the weights
        depths.clear()
        # the base is the best merged set for these (over enough steps to pay the switch)
        sets = [("a2",), ("a3",), (), ("a2",)]
        return await asyncio.gather(*(engine.generate(request(ids, *s, n=16)) for s in sets))

    results = asyncio.run(run())
    assert all(r.completion_tokens == 16 for r in results)
    # Prefilled under a1, every row would carry a1's negated delta too (depth 2), and the first decode step
    # would switch to the base and build a second plan.
    assert depths and max(depths) == 1
