"""Fusion: linear sums match the Switcher bit for bit; TIES on hand-built examples with known answers."""

from __future__ import annotations

import pytest
import torch
from random_adapters import random_adapter

from shira_core import FusionError, SparseAdapter, SparseDelta, Switcher, fuse, fuse_linear, fuse_ties

from .conftest import unique_weights

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
EMBED = "model.embed_tokens.weight"


def one_layer(name: str, indices: list[int], values: list[float], shape: tuple[int, ...] = (4, 4)) -> SparseAdapter:
    return SparseAdapter(name, {"w": SparseDelta("w", shape, torch.tensor(indices), torch.tensor(values))}, "rand")


def as_dict(adapter: SparseAdapter, layer: str = "w") -> dict[int, float]:
    d = adapter.deltas[layer]
    return dict(zip(d.indices.tolist(), d.values.tolist(), strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_linear_equals_switcher_apply_of_the_set(tiny_llama, dtype):
    model = tiny_llama(seed=0, dtype=dtype)
    switcher = Switcher(model)
    a = random_adapter(model, "a", 11, [EMBED, Q0, UP0])
    b = random_adapter(model, "b", 12, [Q0, UP0, DOWN1], dtype=torch.bfloat16)
    c = random_adapter(model, "c", 13, [Q0, DOWN1])
    items = [(a, 0.6), (b, 0.4), (c, -0.3)]
    switcher.apply(items)
    direct = {n: w.clone() for n, w in unique_weights(model).items()}
    switcher.revert()
    fused = fuse_linear(items, name="abc")
    switcher.apply([(fused, 1.0)])
    for name, weight in unique_weights(model).items():
        assert torch.equal(weight, direct[name]), name
    assert fused.nnz == switcher.active.nnz  # same union of indices
    fused.validate()


def test_overlapping_indices_add():
    a = one_layer("a", [1, 3], [1.0, 2.0])
    b = one_layer("b", [3, 5], [10.0, 20.0])
    fused = fuse_linear([(a, 1.0), (b, 0.5)], name="ab")
    assert as_dict(fused) == {1: 1.0, 3: 7.0, 5: 10.0}
    assert fused.name == "ab" and fused.mask == "fused-linear"
    assert fused.deltas["w"].indices.dtype == torch.int16
    assert fuse([(a, 1.0), (b, 0.5)]).deltas["w"].values.tolist() == [1.0, 7.0, 10.0]


def test_layers_touched_by_one_adapter_are_kept():
    a = SparseAdapter("a", {"x": SparseDelta("x", (2, 2), torch.tensor([0]), torch.tensor([1.0]))})
    b = SparseAdapter("b", {"y": SparseDelta("y", (3,), torch.tensor([2]), torch.tensor([4.0]))})
    fused = fuse_linear([(a, 2.0), (b, 0.25)])
    assert as_dict(fused, "x") == {0: 2.0} and as_dict(fused, "y") == {2: 1.0}
    assert fused.deltas["y"].shape == (3,)


TIES_SET = [
    (one_layer("a", [0, 1, 2, 3], [1.0, -2.0, 3.0, 0.5]), 1.0),
    (one_layer("b", [0, 1, 2, 4], [3.0, 1.0, -1.0, 2.0]), 1.0),
    (one_layer("c", [0, 1, 3], [-1.0, 4.0, -0.5]), 1.0),
]


def test_ties_sign_election_and_disjoint_mean():
    # idx 0: 1, 3, -1 -> sum +3, mean of (1, 3) = 2; idx 1: -2, 1, 4 -> +, mean of (1, 4) = 2.5;
    # idx 2: 3, -1 -> +, 3; idx 3: 0.5, -0.5 -> sums to 0, no sign wins, dropped; idx 4: 2.
    fused = fuse_ties(TIES_SET, keep=1.0)
    assert as_dict(fused) == {0: 2.0, 1: 2.5, 2: 3.0, 4: 2.0}
    assert fused.mask == "fused-ties"


def test_ties_trim_keeps_the_top_fraction():
    # keep 0.5: a keeps 3 (idx 2) and -2 (idx 1); b keeps 3 (idx 0) and 2 (idx 4); c keeps ceil(1.5) = 2: 4, -1.
    # idx 0: 3, -1 -> +, 3; idx 1: -2, 4 -> +, 4; idx 2: 3; idx 4: 2.
    assert as_dict(fuse_ties(TIES_SET, keep=0.5)) == {0: 3.0, 1: 4.0, 2: 3.0, 4: 2.0}
    single = one_layer("s", list(range(8)), [0.1, -0.9, 0.3, 0.8, -0.2, 0.05, -0.7, 0.4])
    assert as_dict(fuse_ties([(single, 1.0)], keep=0.25)) == pytest.approx({1: -0.9, 3: 0.8})


def test_ties_weights_scale_before_election():
    a = one_layer("a", [0], [1.0])
    b = one_layer("b", [0], [-1.0])
    assert as_dict(fuse_ties([(a, 3.0), (b, 1.0)], keep=1.0)) == {0: 3.0}
    assert as_dict(fuse_ties([(a, 1.0), (b, 2.0)], keep=1.0)) == {0: -2.0}
    assert fuse([(a, 3.0), (b, 1.0)], merge="ties").mask == "fused-ties"


def test_fused_adapter_carries_the_first_fingerprint():
    a = one_layer("a", [0], [1.0])
    a.base_fingerprint = {"id": "base1"}
    b = one_layer("b", [1], [1.0])
    assert fuse_linear([(a, 1.0), (b, 1.0)]).base_fingerprint == {"id": "base1"}


@pytest.mark.parametrize("fn", [fuse_linear, fuse_ties], ids=["linear", "ties"])
def test_fusion_errors(fn):
    a = one_layer("a", [0, 1], [1.0, 2.0])
    with pytest.raises(FusionError, match="at least one"):
        fn([])
    for bad in (float("nan"), float("inf"), "0.5", None):
        with pytest.raises(FusionError, match=r"adapter 'a' must be a finite number"):
            fn([(a, bad)])
    wide = one_layer("wide", [0], [1.0], shape=(2, 8))
    with pytest.raises(FusionError, match=r"shape of layer w: \[4, 4\] vs \[2, 8\] \(adapter 'wide'\)"):
        fn([(a, 1.0), (wide, 1.0)])


def test_bad_merge_name_and_keep():
    a = one_layer("a", [0], [1.0])
    with pytest.raises(FusionError, match=r"unknown merge 'dare'; use one of linear, ties"):
        fuse([(a, 1.0)], merge="dare")
    for keep in (0.0, -0.5, 1.5):
        with pytest.raises(FusionError, match="keep fraction"):
            fuse_ties([(a, 1.0)], keep=keep)
