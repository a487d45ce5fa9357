"""The five SHiRA masks: counts, exact top-k choices, seeds, exclusion and errors."""

from __future__ import annotations

import pytest
import torch

from shira_core import MASKS, MaskError, build_masks
from shira_core.masks import grad_mask, rand_mask, snip_mask, struct_mask, wm_mask

SHAPES = [(64, 32), (32, 64), (48, 48)]


def weight_and_grad(shape: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def top_k(score: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(score.reshape(-1), k).indices.tolist())


def assert_flat_indices(idx: torch.Tensor, numel: int) -> None:
    assert idx.dtype == torch.int64 and idx.dim() == 1
    assert idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < numel)
    assert bool((idx[1:] > idx[:-1]).all()), "indices must be sorted and unique"


@pytest.mark.parametrize("kind", ["rand", "wm", "grad", "snip"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.01, 0.05, 0.3, 1.0])
def test_exact_count(kind, shape, density):
    w, g = weight_and_grad(shape)
    idx = MASKS[kind](w, density, grad=g)
    assert_flat_indices(idx, w.numel())
    assert idx.numel() == max(1, round(density * w.numel()))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.05, 0.1, 0.3])
def test_struct_rows_plus_diagonal_and_full_rank(shape, density):
    w, _ = weight_and_grad(shape)
    idx = struct_mask(w, density, seed=3)
    assert_flat_indices(idx, w.numel())
    rows, cols = shape
    assert abs(idx.numel() - round(density * w.numel())) <= cols  # whole rows: within one row of the target
    keep = torch.zeros(w.numel(), dtype=torch.bool)
    keep[idx] = True
    keep = keep.view(shape)
    diag = torch.arange(min(shape))
    assert bool(keep[diag, diag].all())
    full_rows = keep.all(dim=1)
    assert int(full_rows.sum()) >= 1
    assert int(keep.sum()) == int(full_rows.sum()) * cols + int((~full_rows[: min(shape)]).sum())
    masked = torch.where(keep, w, torch.zeros(()))
    assert int(torch.linalg.matrix_rank(masked.double())) == min(shape)


def test_struct_needs_2d():
    with pytest.raises(MaskError, match=r"2-D weight, got shape \[4, 4, 4\]"):
        struct_mask(torch.randn(4, 4, 4), 0.1)


def test_wm_grad_snip_pick_the_exact_top_scores():
    w, g = weight_and_grad((64, 32), seed=5)
    k = round(0.05 * w.numel())
    assert wm_mask(w, 0.05).tolist() == top_k(w.abs(), k)
    assert grad_mask(w, 0.05, grad=g).tolist() == top_k(g.abs(), k)
    assert snip_mask(w, 0.05, grad=g).tolist() == top_k((w * g).abs(), k)
    # The three scores differ, so the three masks must too.
    assert len({tuple(wm_mask(w, 0.05).tolist()), tuple(grad_mask(w, 0.05, grad=g).tolist()),
                tuple(snip_mask(w, 0.05, grad=g).tolist())}) == 3


def test_wm_works_on_half_precision_weights():
    w, _ = weight_and_grad((32, 32), seed=6)
    assert wm_mask(w.bfloat16(), 0.1).tolist() == top_k(w.bfloat16().float().abs(), round(0.1 * w.numel()))


@pytest.mark.parametrize("kind", list(MASKS))
def test_same_seed_same_mask(kind):
    w, g = weight_and_grad((48, 48))
    assert torch.equal(MASKS[kind](w, 0.1, seed=7, grad=g), MASKS[kind](w, 0.1, seed=7, grad=g))


@pytest.mark.parametrize("kind", ["rand", "struct"])
def test_different_seed_different_random_mask(kind):
    w, _ = weight_and_grad((48, 48))
    assert not torch.equal(MASKS[kind](w, 0.1, seed=1), MASKS[kind](w, 0.1, seed=2))


@pytest.mark.parametrize("kind", ["rand", "wm", "grad", "snip"])
def test_exclude_gives_disjoint_next_top(kind):
    w, g = weight_and_grad((64, 32), seed=8)
    first = MASKS[kind](w, 0.01, grad=g)
    second = MASKS[kind](w, 0.01, grad=g, exclude=first.to(torch.int16))  # adapters store narrow indices
    assert_flat_indices(second, w.numel())
    assert second.numel() == first.numel()
    assert not set(first.tolist()) & set(second.tolist())
    if kind != "rand":  # the paper's "next top 1%": together they are the top 2%
        both = MASKS[kind](w, 2 * first.numel() / w.numel(), grad=g)
        assert sorted(first.tolist() + second.tolist()) == both.tolist()


def test_struct_exclude_is_disjoint():
    w, _ = weight_and_grad((64, 32))
    first = struct_mask(w, 0.1, seed=0)
    second = struct_mask(w, 0.1, seed=1, exclude=first)
    assert second.numel() > 0 and not set(first.tolist()) & set(second.tolist())
    with pytest.raises(MaskError, match="empty after excluding"):
        struct_mask(w, 0.1, seed=0, exclude=first)  # same rows, same diagonal: nothing left


@pytest.mark.parametrize("kind", ["grad", "snip"])
def test_gradient_masks_need_gradients(kind):
    w, _ = weight_and_grad((16, 16))
    with pytest.raises(MaskError, match=rf"the {kind} mask needs accumulated gradients"):
        MASKS[kind](w, 0.1)


@pytest.mark.parametrize("kind", list(MASKS))
@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_unit_interval(kind, density):
    w, g = weight_and_grad((16, 16))
    with pytest.raises(MaskError, match=r"density must be in \(0, 1\]"):
        MASKS[kind](w, density, grad=g)


@pytest.mark.parametrize("kind", list(MASKS))
def test_excluding_everything(kind):
    w, g = weight_and_grad((16, 16))
    with pytest.raises(MaskError, match=r"only 0 of 256|empty after excluding"):
        MASKS[kind](w, 0.1, grad=g, exclude=torch.arange(256))


def test_excluding_too_much_names_the_numbers():
    w, _ = weight_and_grad((16, 16))
    with pytest.raises(MaskError, match=r"asked for 26 entries but only 6 of 256 are not excluded"):
        rand_mask(w, 0.1, exclude=torch.arange(250))


def test_build_masks_over_layers():
    weights = {"a": weight_and_grad((32, 16), 1)[0], "b": weight_and_grad((32, 16), 2)[0]}
    grads = {"a": weight_and_grad((32, 16), 3)[1], "b": weight_and_grad((32, 16), 4)[1]}
    rand = build_masks(weights, "rand", 0.1, seed=5)
    assert set(rand) == {"a", "b"} and not torch.equal(rand["a"], rand["b"])  # seed + position per layer
    assert torch.equal(rand["b"], rand_mask(weights["b"], 0.1, seed=6))
    assert list(build_masks(weights, "wm", 0.1, names=["b"])) == ["b"]
    snip = build_masks(weights, "snip", 0.1, grads=grads)
    assert torch.equal(snip["a"], snip_mask(weights["a"], 0.1, grad=grads["a"]))
    again = build_masks(weights, "wm", 0.1, exclude=build_masks(weights, "wm", 0.1))
    assert not set(again["a"].tolist()) & set(wm_mask(weights["a"], 0.1).tolist())
    with pytest.raises(MaskError, match="no accumulated gradient for layer b"):
        build_masks(weights, "grad", 0.1, grads={"a": grads["a"]})
    with pytest.raises(MaskError, match=r"unknown mask 'lora'; use one of struct, rand, wm, grad, snip"):
        build_masks(weights, "lora")
