"""Batched row corrections: a batch whose rows use different adapter sets gives each row its own set's logits."""

from __future__ import annotations

import copy

import pytest
import torch
from random_adapters import random_adapter

from shira_core.batched import RowCorrector, UnbatchableSetError
from shira_core.batched.deltas import GROUP, WINDOW
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.switcher import Switcher


@pytest.fixture(params=[False], ids=["torch"])
def bound(request, tiny_llama):
    """A model, its Switcher and RowCorrector, and plans of four sets. PyTorch's products unless a test asks for the
    native kernel (`@pytest.mark.parametrize("bound", [True], indirect=True)`)."""
    model = tiny_llama(seed=3, vocab=64, hidden=32)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    switcher = Switcher(model)
    corrector = RowCorrector(model, switcher, native=request.param)
    assert corrector.native == request.param  # the kernel builds here: a machine with a C++ compiler
    singles = [random_adapter(model, f"s{i}", i + 1, std=0.3, mask_seed_step=100) for i in range(3)]
    plans = [switcher.prepare([(single, 1.0)]) for single in singles]
    m1, m2 = (random_adapter(model, name, seed, std=0.3, mask_seed_step=100) for name, seed in (("m1", 7), ("m2", 8)))
    plans.append(switcher.prepare([(m1, 0.6), (m2, 0.5)]))
    yield model, switcher, corrector, plans, snapshot
    corrector.close()


@torch.inference_mode()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.inference_mode()
def isolated(model, switcher, plans, sets: list[int | None], ids: torch.Tensor) -> torch.Tensor:
    out = []
    for r, s in enumerate(sets):
        if s is None:
            switcher.revert()
        else:
            switcher.apply(plans[s])
        out.append(logits(model, ids[r : r + 1])[0])
    switcher.revert()
    return torch.stack(out)


def row_terms(corrector, switcher, plans, sets: list[int | None], merged: int | None) -> list[tuple]:
    """Applies the merged set (None: the base); each row gets d_S - d_M, its own delta and the merged one negated."""
    if merged is not None:
        switcher.apply(plans[merged])
    deltas = [corrector.delta(p) for p in plans]
    minus_merged = () if merged is None else (corrector.delta(plans[merged], negate=True),)
    return [() if s == merged else ((deltas[s],) if s is not None else ()) + minus_merged for s in sets]


@pytest.mark.parametrize("bound", [False, True], indirect=True, ids=["torch", "native"])
@pytest.mark.parametrize("merged", [None, 0, 3])
def test_guest_rows_match_each_row_run_alone_with_its_set(bound, merged):
    model, switcher, corrector, plans, snapshot = bound
    sets = [0, None, 1, 0, 2, 3, 3, None]  # None: base rows
    ids = torch.randint(0, 64, (len(sets), 6), generator=torch.Generator().manual_seed(1))
    expected = isolated(model, switcher, plans, sets, ids)
    expected_last = isolated(model, switcher, plans, sets, ids[:, -1:])
    row_deltas = row_terms(corrector, switcher, plans, sets, merged)

    with corrector.active(corrector.prefill_plan(row_deltas)):
        mixed = logits(model, ids)  # many tokens per row: the prefill plan
    with corrector.active(corrector.decode_plan(row_deltas)):
        mixed_last = logits(model, ids[:, -1:])  # one token per row: the decode plan
    plain = logits(model, ids)
    switcher.revert()

    torch.testing.assert_close(mixed, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mixed_last, expected_last, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the sets really differ from the merged set alone
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("bound", [True], indirect=True, ids=["native"])
@pytest.mark.parametrize("merged", [None, 1])
def test_the_native_kernel_reads_each_delta_once_for_all_its_rows(bound, merged):
    model, switcher, corrector, plans, snapshot = bound
    # Set 0 on 11 rows (blocks of 8 and 3), set 2 on 4, set 3 on 2, set 1 on one (the merged set's negated delta: 18
    # rows, 8 + 8 + 2), and a base row: every block size.
    sets = [0] * 5 + [2, None, 1] + [0] * 6 + [2, 3, 2, 2, 3]
    ids = torch.randint(0, 64, (len(sets), 1), generator=torch.Generator().manual_seed(9))
    expected = isolated(model, switcher, plans, sets, ids)
    if merged is not None:
        switcher.apply(plans[merged])
    deltas = {s: corrector.delta(plans[s]) for s in (0, 1, 2, 3)}
    minus_merged = () if merged is None else (corrector.delta(plans[merged], negate=True),)
    terms = [() if s == merged else ((deltas[s],) if s is not None else ()) + minus_merged for s in sets]
    plan = corrector.decode_plan(terms)
    assert plan.nbytes == 0  # it points into the deltas
    own = {s for s in sets if s not in (None, merged)}
    assert plan.terms.shape[0] == len(own) + len(minus_merged)  # one term per distinct delta, not one per row
    with corrector.active(plan):
        got = logits(model, ids)
    switcher.revert()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert corrector.decode_plan(terms) is plan and corrector.builds == 1
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())


@pytest.mark.parametrize("merged", [None, 1])
def test_native_plans_run_prefills_and_decode_steps_over_several_blocks(tiny_llama, merged):
    # hidden 96: outputs of 48 to 192 features, so one to three windows of 64 rows and partial ones; 11 tokens a
    # row: lanes of eight that span rows and end short.
    model = tiny_llama(seed=5, vocab=64, hidden=96)
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    switcher = Switcher(model)
    corrector = RowCorrector(model, switcher, native=True)
    singles = [random_adapter(model, f"s{i}", i + 1, std=0.3, mask_seed_step=100) for i in range(3)]
    plans = [switcher.prepare([(single, 1.0)]) for single in singles]
    sets = [2, 0, None, 2, 1, 0]
    ids = torch.randint(0, 64, (len(sets), 11), generator=torch.Generator().manual_seed(10))
    expected = isolated(model, switcher, plans, sets, ids)
    expected_last = isolated(model, switcher, plans, sets, ids[:, -1:])
    terms = row_terms(corrector, switcher, plans, sets, merged)
    builds = corrector.builds
    prefill = corrector.prefill_plan(terms[3:], running=terms[:3], steps=30)
    assert prefill.nbytes == 0 and corrector.planner._segments == {}  # no block-diagonal copy for the prefill either
    with corrector.active(prefill):
        got = logits(model, ids[3:])
    with corrector.active(corrector.prefill_plan(terms)):
        got_all = logits(model, ids)
    with corrector.active(corrector.decode_plan(terms)):
        got_last = logits(model, ids[:, -1:])
    switcher.revert()
    corrector.close()
    assert corrector.builds == builds + 3
    torch.testing.assert_close(got, expected[3:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_all, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_last, expected_last, rtol=1e-4, atol=1e-4)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in snapshot.items())


def test_the_native_kernel_corrects_a_bf16_model_in_fp32(tiny_llama):
    model = tiny_llama(seed=3, vocab=64, hidden=32).to(torch.bfloat16)
    switcher = Switcher(model)
    corrector = RowCorrector(model, switcher)
    assert corrector.native and corrector.dtype == torch.float32  # the sums run in fp32, rounded into bf16 outputs
    singles = [random_adapter(model, f"s{i}", i + 1, std=0.3, mask_seed_step=100) for i in range(2)]
    plans = [switcher.prepare([(single, 1.0)]) for single in singles]
    ids = torch.randint(0, 64, (3, 1), generator=torch.Generator().manual_seed(11))
    expected = isolated(model, switcher, plans, [1, 0, None], ids).float()
    a, b = (corrector.delta(p) for p in plans)
    with corrector.active(corrector.decode_plan([(b,), (a,), ()])):
        got = logits(model, ids).float()
    plain = logits(model, ids).float()
    corrector.close()
    torch.testing.assert_close(got, expected, rtol=0.03, atol=0.03)
    assert not torch.allclose(plain[:2], expected[:2], atol=0.1)  # the sets really change those rows


def test_a_prefill_of_several_runs_shares_the_decode_plan_and_one_run_does_not(bound):
    model, switcher, corrector, plans, _ = bound
    a, b = corrector.delta(plans[0]), corrector.delta(plans[1])
    mixed = [(a,), (b,), (a,)]  # three runs: one block-diagonal product per layer
    assert corrector.prefill_plan(mixed) is corrector.decode_plan(mixed)  # built once for the prefill and the steps
    single = corrector.prefill_plan([(a,), (a,)])  # one run: one in-place product, no copy of the deltas
    assert single is not corrector.decode_plan([(a,), (a,)])
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = isolated(model, switcher, plans, [0, 0], ids)
    with corrector.active(single):
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-4, atol=1e-4)


def test_rows_prefilled_together_keep_their_segment_when_others_join_or_leave(bound, monkeypatch):
    model, switcher, corrector, plans, _ = bound
    monkeypatch.setattr("shira_core.batched.planner.SEGMENT_PRODUCT_SECONDS", 0.0)  # an extra segment is free
    a, b, c = (corrector.delta(p) for p in plans[:3])
    first, joiners = [(a,), (b,)], [(c,), (), (a,)]
    ids = torch.randint(0, 64, (5, 1), generator=torch.Generator().manual_seed(5))

    def check(terms, sets, builds):
        plan = corrector.decode_plan(terms)
        assert corrector.builds == builds
        with corrector.active(plan):
            got = logits(model, ids[: len(sets)])
        torch.testing.assert_close(got, isolated(model, switcher, plans, sets, ids[: len(sets)]), rtol=1e-4,
                                   atol=1e-4)

    corrector.prefill_plan(first)  # two runs: a segment, built for the prefill
    assert corrector.builds == 1
    check(first, [0, 1], 1)  # the first step reuses it
    corrector.prefill_plan(joiners)
    assert corrector.builds == 2
    check(first + joiners, [0, 1, 2, None, 0], 2)  # joining: both segments side by side, no copy
    check(joiners, [2, None, 0], 2)  # a whole segment left: the other one stays
    check([(b,), *joiners], [1, 2, None, 0], 3)  # an unknown run: only that run is built
    new_rows = corrector.prefill_plan([(b,), (c,)])  # new rows get one segment, not the cached one of (b,) and another
    assert corrector.builds == 4 and len(new_rows.segments) == 1


def test_when_extra_segments_cost_more_than_a_rebuild_the_batch_gets_one_and_leavers_keep_parts(bound, monkeypatch):
    model, switcher, corrector, plans, _ = bound
    monkeypatch.setattr("shira_core.batched.planner.SEGMENT_PRODUCT_SECONDS", 1.0)  # any rebuild pays
    a, b, c = (corrector.delta(p) for p in plans[:3])
    ids = torch.randint(0, 64, (5, 1), generator=torch.Generator().manual_seed(7))

    def check(plan, sets, rows):
        assert len(plan.segments) == 1
        with corrector.active(plan):
            got = logits(model, ids[rows])
        torch.testing.assert_close(got, isolated(model, switcher, plans, sets, ids[rows]), rtol=1e-4, atol=1e-4)

    corrector.prefill_plan([(a,), (b,)])  # a fresh batch: its segment
    corrector.decode_plan([(a,), (b,)], steps=30)
    assert corrector.builds == 1
    joiners = corrector.prefill_plan([(c,), (a,), ()], running=[(a,), (b,)], steps=30)  # one segment for all five
    assert corrector.builds == 3  # the batch's segment and the joiners' part of it (for the prefill only)
    check(joiners, [2, 0, None], slice(2, 5))
    everyone = corrector.decode_plan([(a,), (b,), (c,), (a,), ()], steps=30)
    assert corrector.builds == 3  # built by the prefill
    check(everyone, [0, 1, 2, 0, None], slice(0, 5))
    left = corrector.decode_plan([(c,), (a,), ()], steps=29)  # the first two rows finished: a part, no rebuild
    assert corrector.builds == 4 and len(corrector.planner._segments) == 1
    check(left, [2, 0, None], slice(2, 5))
    corrector.forget_plans()
    corrector.prefill_plan([(a,), (b,), (c,)])
    middle = corrector.decode_plan([(b,), (c,)], steps=1)  # the first row left: a part cut from the segment
    assert corrector.builds == 6
    check(middle, [1, 2], slice(1, 3))


def test_a_plan_of_too_many_segments_is_built_as_one(bound, monkeypatch):
    model, switcher, corrector, plans, _ = bound
    monkeypatch.setattr("shira_core.batched.planner.MAX_SEGMENTS", 1)
    a, b, c = (corrector.delta(p) for p in plans[:3])
    corrector.prefill_plan([(a,), (b,)])
    corrector.prefill_plan([(c,), (a,)])
    plan = corrector.decode_plan([(a,), (b,), (c,), (a,)])
    assert corrector.builds == 3 and len(plan.segments) == 1
    ids = torch.randint(0, 64, (4, 1), generator=torch.Generator().manual_seed(6))
    with corrector.active(plan):
        got = logits(model, ids)
    torch.testing.assert_close(got, isolated(model, switcher, plans, [0, 1, 2, 0], ids), rtol=1e-4, atol=1e-4)


def test_wrappers_do_nothing_without_a_plan_and_close_removes_them(bound):
    model, switcher, corrector, plans, _ = bound
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    before = logits(model, ids)
    delta = corrector.delta(plans[0])
    plan = corrector.decode_plan([(delta,), ()])
    assert corrector.decode_plan([(delta,), ()]) is plan  # same composition: the built plan again
    assert corrector.decode_plan([(), (delta,)]) is not plan
    corrector.close()
    with corrector.active(corrector.prefill_plan([(delta,), (delta,)])):
        after = logits(model, ids)  # wrappers removed: the plan has no effect
    assert torch.equal(before, after)


def wrapped(linears) -> list[bool]:
    return ["forward" in m.__dict__ for m in linears]


def test_wrappers_are_there_only_while_plans_are_in_use_and_a_deep_copy_is_not_corrected(bound):
    model, _, corrector, plans, _ = bound
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    before = logits(model, ids)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert not any(wrapped(linears))  # no plan yet: the plain Linear forwards
    plan = corrector.prefill_plan([(corrector.delta(plans[0]),), ()])
    with corrector.active(plan):
        corrected = logits(model, ids)
        twin = copy.deepcopy(model)  # copies the wrappers too
    assert any(wrapped(linears)) and not any(m._forward_hooks for m in linears)
    with corrector.active(plan):
        assert torch.equal(logits(twin, ids), before)  # the copied wrappers compute the copy's own layers
        twin.model.layers[0].mlp.down_proj.weight.data.zero_()
        assert not torch.equal(logits(twin, ids), before)  # ... and not the original's
    assert not torch.allclose(corrected[0], before[0], atol=1e-3)
    corrector.forget_plans()
    assert not any(wrapped(linears))
    assert torch.equal(logits(model, ids), before)


def test_a_forward_another_library_set_on_a_linear_runs_inside_the_wrapper_and_comes_back(bound):
    model, _, corrector, plans, _ = bound
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    down = model.model.layers[0].mlp.down_proj

    def doubled(self, x):
        return 2 * torch.nn.functional.linear(x, self.weight, self.bias)

    down.forward = doubled.__get__(down)
    theirs = down.forward
    before = logits(model, ids)
    with corrector.active(corrector.decode_plan([(), ()])):  # no deltas: a plain pass through the wrappers
        assert torch.equal(logits(model, ids), before)
    corrector.forget_plans()
    assert down.forward == theirs


@pytest.mark.parametrize("bound", [False, True], indirect=True, ids=["torch", "native"])
def test_a_plan_for_another_row_count_is_refused(bound):
    model, _, corrector, plans, _ = bound
    delta = corrector.delta(plans[1])
    with corrector.active(corrector.decode_plan([(delta,), (), ()])), pytest.raises(RuntimeError, match="3 rows"):
        logits(model, torch.zeros(2, 1, dtype=torch.long))


@pytest.mark.parametrize("bound", [True], indirect=True, ids=["native"])
def test_the_native_kernel_refuses_shapes_and_rows_that_do_not_fit(bound):
    _, _, corrector, plans, _ = bound
    plan = corrector.decode_plan([(corrector.delta(plans[1]),), ()])
    kernel, n_in, n_out = corrector._kernel, corrector.layers[0].in_features, corrector.layers[0].out_features
    with pytest.raises(RuntimeError, match="do not match"):  # tokens in the input, none in the output
        kernel.correct(plan.terms, plan.row_table, 0, torch.zeros(2, 3, n_in), torch.zeros(2, n_out))
    with pytest.raises(RuntimeError, match="outside the batch of 1"):  # the plan's row 0 and 1 on a batch of 1
        kernel.correct(plan.terms, torch.tensor([0, 1, 1]), 0, torch.zeros(1, n_in), torch.zeros(1, n_out))
    with pytest.raises(RuntimeError, match="outside the plan"):
        kernel.correct(plan.terms, plan.row_table, len(corrector.layers), torch.zeros(2, n_in), torch.zeros(2, n_out))


def test_a_set_that_changes_a_tied_embedding_cannot_be_a_guest(bound):
    model, switcher, corrector, _, _ = bound
    name = "model.embed_tokens.weight"  # tied to lm_head: used by nn.Embedding too
    shape = tuple(dict(model.named_parameters())[name].shape)
    emb = SparseAdapter("emb", {name: SparseDelta(name, shape, torch.tensor([3, 70]), torch.tensor([0.5, -0.5]))})
    with pytest.raises(UnbatchableSetError, match=r"'emb'.*embed_tokens"):
        corrector.delta(switcher.prepare([(emb, 1.0)], label="emb"))


def _dense(d, shape: tuple[int, int]) -> torch.Tensor:
    """A layer delta's entries as a dense [out, in] matrix, from whichever form it holds."""
    if d.groups is None:
        return d.matrix.to_dense()
    windows, start, lane, col, values = d.groups
    assert len(windows) == (shape[0] + WINDOW - 1) // WINDOW + 1
    group_window = torch.repeat_interleave(torch.arange(len(windows) - 1), windows.diff().long())
    entry_group = torch.repeat_interleave(torch.arange(len(start) - 1), start.diff().long())
    slot = (torch.arange(len(col)) - start.long()[entry_group]) % GROUP  # the j-th entry of each piece in turn
    local = lane.long()[entry_group * GROUP + slot]
    real = local < WINDOW
    assert not values[~real].any()  # empty lanes pad with zeros
    rows = group_window[entry_group] * WINDOW + local
    dense = torch.zeros(shape)
    dense.index_put_((rows[real], col.long()[real] & 0xFFFF), values[real], accumulate=True)
    return dense


@pytest.mark.parametrize("bound", [False, True], ids=["torch", "native"], indirect=True)
def test_delta_holds_exactly_the_plan_entries_in_one_form(bound):
    model, switcher, corrector, plans, _ = bound
    delta = corrector.delta(plans[3])
    params = dict(model.named_parameters())
    switcher.apply(plans[3])
    adapted = {layer.name: params[layer.name].detach().clone() for layer in corrector.layers}
    switcher.revert()
    entries = slots = 0
    for lid, d in delta.layers.items():
        name = corrector.layers[lid].name
        shape = tuple(params[name].shape)
        dense = _dense(d, shape)
        torch.testing.assert_close(dense, adapted[name] - params[name].detach(), rtol=0, atol=1e-6)
        entries += int((dense != 0).sum())
        if corrector.native:  # the kernel's groups only: no CSR copy beside them
            assert d.crow is None and d.col is None and d.values is None and d.matrix is None
            slots += d.groups[-1].numel()
        else:
            assert d.groups is None and d.crow.dtype == torch.int32 and int(d.crow[-1]) == d.col.numel()
    assert delta.nnz == plans[3].nnz == entries
    assert delta.nbytes == sum(t.numel() * t.element_size() for d in delta.layers.values() for t in d.tensors())
    if corrector.native:  # 6 bytes a slot (uint16 column, fp32 value), padding a small part, and the group tables
        assert delta.entry_bytes == delta.pointer_bytes == 0
        assert entries <= slots < 1.5 * entries
        assert 6 * slots < delta.nbytes < 8 * slots


@pytest.mark.parametrize("bound", [False, True], ids=["torch", "native"], indirect=True)
def test_a_negated_delta_undoes_the_delta(bound):
    model, _, corrector, plans, _ = bound
    delta, negated = corrector.delta(plans[3]), corrector.delta(plans[3], negate=True)
    assert delta.layers.keys() == negated.layers.keys() and negated.nnz == delta.nnz
    params = dict(model.named_parameters())
    for lid, d in delta.layers.items():
        shape = tuple(params[corrector.layers[lid].name].shape)
        torch.testing.assert_close(_dense(negated.layers[lid], shape), -_dense(d, shape))
    twin = delta.negated()  # shares the index arrays: only the values are its own
    for lid, d in delta.layers.items():
        mine, its = d.tensors(), twin.layers[lid].tensors()
        assert sum(a.data_ptr() == b.data_ptr() for a, b in zip(mine, its, strict=True)) == len(mine) - 1
    assert twin.value_bytes == delta.value_bytes > 0
