"""Switcher: bit-exact revert under any sequence of switches, dense-equivalent adapted weights, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_adapters import random_adapter

from shira_core import (
    FusionError,
    IndexRangeError,
    NonFiniteValueError,
    ShapeMismatchError,
    SparseAdapter,
    SparseDelta,
    Switcher,
    UnknownLayerError,
)

from .conftest import adaptable_names, assert_matches_snapshot, dense_expected, snapshot, unique_weights

EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"  # tied to EMBED
Q0 = "model.layers.0.self_attn.q_proj.weight"
K0 = "model.layers.0.self_attn.k_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"
O1 = "model.layers.1.self_attn.o_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
NORM = "model.norm.weight"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_TEMPLATES: dict[torch.dtype, torch.nn.Module] = {}


@pytest.fixture
def model(tiny_llama):
    return tiny_llama(seed=0)


def fresh_model(tiny_llama, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy of one tied tiny Llama per dtype (building one costs more than copying it)."""
    if dtype not in _TEMPLATES:
        _TEMPLATES[dtype] = tiny_llama(seed=0, dtype=dtype)
    return copy.deepcopy(_TEMPLATES[dtype])


def four_adapters(model: torch.nn.Module, seeds: list[int]) -> list[SparseAdapter]:
    """Overlapping adapters: two touch the tied embedding under both names, value dtypes differ."""
    return [
        random_adapter(model, "a", seeds[0], [EMBED, Q0, UP0, DOWN1]),
        random_adapter(model, "b", seeds[1], [HEAD, Q0, O1, UP0], dtype=torch.bfloat16),
        random_adapter(model, "c", seeds[2], [EMBED, HEAD, DOWN1, K0], dtype=torch.float16),
        random_adapter(model, "d", seeds[3], adaptable_names(model), density=0.05, pool=1.0),
    ]


ALPHAS = st.sampled_from([1.0, 0.6, 0.4, -0.5, 2.0]) | st.floats(-2, 2, allow_nan=False, width=32)
WEIGHTED_SET = st.lists(st.tuples(st.integers(0, 3), ALPHAS), min_size=1, max_size=2)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("apply"), st.integers(0, 2), st.booleans()),  # set, as a prepared plan?
        st.tuples(st.just("prepare"), st.integers(0, 2)),  # keep a plan for later, maybe built while active
        st.tuples(st.just("reapply"), st.integers(0, 7)),  # apply a kept plan again
        st.tuples(st.just("revert")),
    ),
    min_size=1,
    max_size=10,
)


def assert_state(model: torch.nn.Module, base: dict[str, torch.Tensor], items) -> None:
    expected = dense_expected(model, base, items) if items else base
    for name, weight in unique_weights(model).items():
        if not torch.equal(weight, expected[name]):
            diff = (weight.float() - expected[name].float()).abs()
            count, worst = int((diff > 0).sum()), float(diff.max())
            pytest.fail(f"{name}: {count} entries differ from W0 + sum(alpha*delta), max {worst}")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seeds=st.lists(st.integers(0, 2**16), min_size=4, max_size=4),
    sets=st.lists(WEIGHTED_SET, min_size=3, max_size=3),
    ops=OPS,
)
def test_any_switch_sequence_matches_dense_sum_and_reverts_bit_exact(tiny_llama, dtype, seeds, sets, ops):
    model = fresh_model(tiny_llama, dtype)
    before = snapshot(model)
    switcher = Switcher(model)
    base = {n: w.clone() for n, w in unique_weights(model).items()}
    assert_matches_snapshot(model, before)  # binding changes storage, never values
    adapters = four_adapters(model, seeds)
    weighted = [[(adapters[i], a) for i, a in s] for s in sets]
    plans: list[tuple[object, list]] = []
    active: list | None = None
    active_plan = None
    for op in [*ops, ("revert",)]:
        if op[0] == "apply":
            items = weighted[op[1]]
            target = switcher.prepare(items) if op[2] else items
            result = switcher.apply(target)
            assert result.kind == ("apply" if active is None else "transition")
            active, active_plan = items, switcher.active
        elif op[0] == "prepare":
            plans.append((switcher.prepare(weighted[op[1]]), weighted[op[1]]))
        elif op[0] == "reapply" and plans:
            plan, items = plans[op[1] % len(plans)]
            result = switcher.apply(plan)
            expected_kind = "noop" if plan is active_plan else "apply" if active is None else "transition"
            assert result.kind == expected_kind
            active, active_plan = items, plan
        elif op[0] == "revert":
            assert switcher.revert().kind == ("noop" if active is None else "revert")
            active, active_plan = None, None
        assert_state(model, base, active)
    assert_matches_snapshot(model, before)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert switcher.memory()["saved_originals"] == 0


def test_binding_keeps_logits_identical(model):
    ids = torch.tensor([[1, 5, 9, 33, 2, 60]])
    with torch.no_grad():
        before = model(ids).logits
        switcher = Switcher(model)
        after = model(ids).logits
        switcher.apply([(random_adapter(model, "a", 1, adaptable_names(model), std=0.5), 1.0)])
        adapted = model(ids).logits
        switcher.revert()
        reverted = model(ids).logits
    assert torch.equal(before, after)
    assert not torch.equal(before, adapted)
    assert torch.equal(before, reverted)


def test_tied_alias_delta_changes_both_names(model):
    switcher = Switcher(model)
    w0 = model.lm_head.weight.detach().clone()
    delta = SparseDelta(HEAD, tuple(w0.shape), torch.tensor([0, 7, 100]), torch.tensor([1.0, -2.0, 3.0]))
    switcher.apply([(SparseAdapter("head", {HEAD: delta}), 0.5)])
    flat = model.model.embed_tokens.weight.detach().reshape(-1)
    assert torch.equal(flat[[0, 7, 100]], w0.reshape(-1)[[0, 7, 100]] + torch.tensor([0.5, -1.0, 1.5]))
    switcher.revert()
    assert torch.equal(model.lm_head.weight, w0)


def test_unknown_layer(model):
    switcher = Switcher(model)
    ghost = SparseDelta("model.layers.9.mlp.up_proj.weight", (64, 32), torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(UnknownLayerError, match=r"'ghost'.*model\.layers\.9\.mlp\.up_proj\.weight"):
        switcher.prepare([(SparseAdapter("ghost", {ghost.name: ghost}), 1.0)])
    norm = SparseDelta(NORM, (32,), torch.tensor([1]), torch.tensor([1.0]))  # 1-D: not adaptable by default
    with pytest.raises(UnknownLayerError, match="model.norm.weight"):
        switcher.prepare([(SparseAdapter("norm", {NORM: norm}), 1.0)])
    with pytest.raises(UnknownLayerError, match="model.layers.7"):
        Switcher(model, names=["model.layers.7.mlp.up_proj.weight"])


def test_wrong_shape(model):
    switcher = Switcher(model)
    bad = SparseDelta(UP0, (32, 64), torch.tensor([1]), torch.tensor([1.0]))
    with pytest.raises(ShapeMismatchError, match=r"up_proj.*'wide'.*\[32, 64\].*\[64, 32\]"):
        switcher.prepare([(SparseAdapter("wide", {UP0: bad}), 1.0)])


def test_out_of_range_index_never_reaches_a_neighbour_weight(model):
    """An unvalidated delta whose index runs past its weight must not write into the next weight in the buffer."""
    switcher = Switcher(model)
    before = snapshot(model)
    numel = 64 * 32
    for idx in (numel, numel + 5, -1):
        bad = SparseDelta(UP0, (64, 32), torch.tensor([3, idx], dtype=torch.int64), torch.tensor([1.0, 1.0]))
        with pytest.raises(IndexRangeError, match=rf"up_proj.*'spill'.*{numel:,}"):
            switcher.apply([(SparseAdapter("spill", {UP0: bad}), 1.0)])
    assert_matches_snapshot(model, before)
    assert switcher.active is None


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_alpha(model, alpha):
    switcher = Switcher(model)
    a = random_adapter(model, "a", 1, [Q0])
    with pytest.raises(FusionError, match=r"'a'.*finite"):
        switcher.prepare([(a, alpha)])
    with pytest.raises(FusionError, match="at least one"):
        switcher.prepare([])


def test_fp16_overflow_raises_and_leaves_weights_untouched(tiny_llama):
    model = tiny_llama(seed=0, dtype=torch.float16)
    switcher = Switcher(model)
    huge = SparseDelta(Q0, (32, 32), torch.tensor([2, 40]), torch.tensor([1.0, 7.0e4]))
    big = SparseAdapter("big", {Q0: huge})
    before = snapshot(model)
    overflow = r"1 adapted weights overflow torch\.float16 .*'big:1'.*q_proj\.weight at flat index 40;"
    with pytest.raises(NonFiniteValueError, match=overflow):
        switcher.apply([(big, 1.0)])
    assert_matches_snapshot(model, before)
    assert switcher.active is None
    # While another set is active, a failed switch leaves that set in place.
    ok = random_adapter(model, "ok", 2, [Q0, UP0])
    switcher.apply([(ok, 1.0)])
    during = snapshot(model)
    plan = switcher.active
    with pytest.raises(NonFiniteValueError):
        switcher.apply([(big, 1.0), (ok, 0.5)])
    assert switcher.active is plan
    assert_matches_snapshot(model, during)
    switcher.revert()
    assert_matches_snapshot(model, before)


def test_memory_reports_active_plan(model):
    switcher = Switcher(model)
    idle = switcher.memory()
    assert idle["saved_originals"] == idle["index_buffers"] == idle["adapted_values"] == 0
    assert idle["weights"] >= sum(p.numel() * 4 for p in unique_weights(model).values() if p.dim() >= 2)
    a = random_adapter(model, "a", 3, [EMBED, Q0, UP0, DOWN1])
    switcher.apply([(a, 1.0)])
    busy = switcher.memory()
    nnz = switcher.active.nnz
    assert nnz == a.nnz > 0  # no two layers share storage here, so every entry is its own slot
    assert busy["saved_originals"] == nnz * 4
    assert busy["index_buffers"] == nnz * 8
    assert busy["weights"] == idle["weights"]
    switcher.revert()
    assert switcher.memory()["saved_originals"] == switcher.memory()["index_buffers"] == 0


@pytest.mark.parametrize("move", ["half", "to_double", "realloc_one"])
def test_reallocated_weights_are_detected(model, move):
    switcher = Switcher(model)
    a = random_adapter(model, "a", 4, adaptable_names(model))
    switcher.apply([(a, 1.0)])
    if move == "half":
        model.half()
    elif move == "to_double":
        model.to(torch.float64)
    else:  # one weight that is not first in its buffer gets new storage
        p = model.get_parameter(DOWN1)
        p.data = p.data.clone()
    with pytest.raises(RuntimeError, match="moved or re-allocated"):
        switcher.revert()
    with pytest.raises(RuntimeError, match="moved or re-allocated"):
        switcher.apply([(a, 0.5)])


def test_plan_prepared_while_active_reverts_to_base(model):
    switcher = Switcher(model)
    before = snapshot(model)
    a = random_adapter(model, "a", 5, [EMBED, Q0, UP0])
    b = random_adapter(model, "b", 6, [HEAD, Q0, DOWN1])  # overlaps a on EMBED (via HEAD) and Q0
    switcher.apply([(a, 1.0)])
    plan_b = switcher.prepare([(b, 1.0), (a, -0.5)])  # originals read while a's values sit in the buffer
    switcher.revert()
    switcher.apply(plan_b)
    switcher.revert()
    assert_matches_snapshot(model, before)
    switcher.apply([(a, 2.0)])
    switcher.apply(plan_b)
    switcher.revert()
    assert_matches_snapshot(model, before)


def test_identical_index_sets_transition_with_one_write(model):
    switcher = Switcher(model)
    a = random_adapter(model, "a", 7, [Q0, UP0])
    b = random_adapter(model, "b", 8, [Q0, UP0])
    base = {n: w.clone() for n, w in unique_weights(model).items()}
    first = switcher.apply([(a, 1.0)])
    assert first.kind == "apply" and first.written == a.nnz
    same = switcher.apply([(a, 0.25)])
    assert same.kind == "transition" and same.written == a.nnz  # not 2 * nnz: originals are not rewritten
    assert_state(model, base, [(a, 0.25)])
    other = switcher.apply([(b, 1.0)])
    assert other.written == a.nnz + b.nnz  # a different index set: restore a, then write b
    assert switcher.apply(switcher.active).kind == "noop"
    assert switcher.revert().written == b.nnz
    assert switcher.revert().kind == "noop"


def test_duplicate_names_bind_once(model):
    """Naming a tied weight under both names must bind it once, so writes land in the live storage."""
    switcher = Switcher(model, names=[EMBED, HEAD, Q0])
    assert sorted(switcher.names) == sorted([EMBED, Q0])
    assert switcher.memory()["weights"] == (64 * 32 + 32 * 32) * 4  # one buffer slot each, no dead copy
    before = snapshot(model)
    base = {n: w.clone() for n, w in unique_weights(model).items()}
    a = random_adapter(model, "a", 9, [HEAD, Q0])
    switcher.apply([(a, 1.0)])
    assert_state(model, base, [(a, 1.0)])
    switcher.revert()
    assert_matches_snapshot(model, before)


def test_a_large_cpu_buffer_is_on_huge_pages_where_linux_offers_them():
    import sys
    from pathlib import Path

    from shira_core import hugepages

    buf = hugepages.zeros(40 * 2**20 // 4, torch.float32, torch.device("cpu"))
    assert buf.numel() == 40 * 2**20 // 4 and buf.dtype == torch.float32 and not buf.any()
    assert buf.data_ptr() % hugepages.HUGE_PAGE == 0
    small = hugepages.zeros(1000, torch.bfloat16, torch.device("cpu"))
    assert small.numel() == 1000 and not small.any()
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if sys.platform.startswith("linux") and mode.exists() and "[never]" not in mode.read_text():
        # Advised: eligible for huge pages (whether the kernel finds free 2 MiB pages at the first write depends on
        # the machine's memory, so that is not asserted).
        assert _smaps_field(buf.data_ptr(), "THPeligible:") == 1


def _smaps_field(address: int, field: str) -> int:
    """A numeric field of the mapping in /proc/self/smaps that holds `address`."""
    from pathlib import Path

    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == field:
            return int(line.split()[1])
    return -1
