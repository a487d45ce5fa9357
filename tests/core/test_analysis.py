"""Layer statistics and the AWOM / AWOR orthogonality metrics against hand-computed and dense references."""

from __future__ import annotations

import math
import time

import pytest
import torch

from shira_core.analysis import (
    adapter_stats,
    awom_awor,
    dense_orthogonality,
    layer_orthogonality,
    layer_stats,
    numerical_rank,
    stats_totals,
)
from shira_core.baselines import LoraFactors
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.errors import ShapeMismatchError


def dense_delta(name: str, dense: torch.Tensor) -> SparseDelta:
    return SparseDelta.from_dense(name, dense)


def random_delta(name: str, shape: tuple[int, int], density: float, gen: torch.Generator) -> SparseDelta:
    numel = shape[0] * shape[1]
    k = max(int(numel * density), 1)
    idx = torch.randperm(numel, generator=gen)[:k].sort().values
    return SparseDelta(name, shape, idx, torch.randn(k, generator=gen))


def dense_reference(a: SparseDelta, b: SparseDelta) -> tuple[float, float]:
    product = a.to_dense(torch.float64).T @ b.to_dense(torch.float64)
    return float(product.norm()), 1.0 - int((product != 0).sum()) / product.numel()


def test_disjoint_row_supports_are_orthogonal() -> None:
    a = torch.zeros(4, 3)
    a[0] = torch.tensor([1.0, 2.0, 3.0])
    a[1, 2] = -1.0
    b = torch.zeros(4, 3)
    b[2] = torch.tensor([4.0, 5.0, 6.0])
    b[3, 0] = 7.0
    row = layer_orthogonality(dense_delta("w", a), dense_delta("w", b))
    assert row["awom"] == 0.0
    assert row["awor"] == 1.0
    assert row["product_nnz"] == 0
    assert row["product_numel"] == 9
    assert row["overlap"] == 0


def test_hand_computed_small_pair() -> None:
    # A1 = [[1, 0], [0, 2]], A2 = [[3, 0], [0, 0]]: A1ᵀA2 = [[3, 0], [0, 0]] -> AWOM 3, AWOR 3/4.
    a = dense_delta("w", torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    b = dense_delta("w", torch.tensor([[3.0, 0.0], [0.0, 0.0]]))
    row = layer_orthogonality(a, b)
    assert row["awom"] == pytest.approx(3.0)
    assert row["awor"] == pytest.approx(0.75)
    assert row["overlap"] == 1
    assert row["overlap_fraction_a"] == pytest.approx(0.5)
    assert row["overlap_fraction_b"] == pytest.approx(1.0)


def test_identical_adapters_give_norm_of_gram_matrix() -> None:
    dense = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0], [4.0, 0.0, 0.0]])
    delta = dense_delta("w", dense)
    row = layer_orthogonality(delta, delta)
    gram = dense.T @ dense  # [[17, 0, 2], [0, 9, 0], [2, 0, 4]]
    assert row["awom"] == pytest.approx(float(gram.norm()))
    assert row["awom"] == pytest.approx(math.sqrt(17**2 + 2 * 2**2 + 9**2 + 4**2))
    assert row["awor"] == pytest.approx(4 / 9)
    assert row["overlap"] == delta.nnz == 4
    assert row["overlap_fraction_a"] == row["overlap_fraction_b"] == 1.0


def test_cancelling_terms_count_as_zero_entries() -> None:
    # Column products cancel: (1*1) + (1*-1) = 0 in entry (0, 0), so ||A1ᵀA2||_0 counts it as zero.
    a = dense_delta("w", torch.tensor([[1.0], [1.0]]))
    b = dense_delta("w", torch.tensor([[1.0], [-1.0]]))
    row = layer_orthogonality(a, b)
    assert row["awom"] == 0.0 and row["awor"] == 1.0


def test_stored_zero_values_do_not_count() -> None:
    # An untrained adapter stores its mask with zero values: overlap is full but the product is zero.
    idx = torch.tensor([0, 3, 5])
    a = SparseDelta("w", (3, 2), idx, torch.zeros(3))
    b = SparseDelta("w", (3, 2), idx, torch.ones(3))
    row = layer_orthogonality(a, b)
    assert row["overlap"] == 3
    assert row["awom"] == 0.0 and row["awor"] == 1.0


@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (33, 33)])
@pytest.mark.parametrize("density", [0.02, 0.1, 0.5])
def test_sparse_computation_matches_dense_reference(shape: tuple[int, int], density: float) -> None:
    gen = torch.Generator().manual_seed(int(density * 1000) + shape[0])
    a = random_delta("w", shape, density, gen)
    b = random_delta("w", shape, density, gen)
    row = layer_orthogonality(a, b)
    awom, awor = dense_reference(a, b)
    assert row["awom"] == pytest.approx(awom, rel=1e-12)
    assert row["awor"] == pytest.approx(awor, abs=1e-12)
    expected_overlap = len(set(a.indices.tolist()) & set(b.indices.tolist()))
    assert row["overlap"] == expected_overlap
    assert row["overlap_fraction_a"] == pytest.approx(expected_overlap / a.nnz)
    assert row["overlap_fraction_b"] == pytest.approx(expected_overlap / b.nnz)


def test_one_dimensional_weights_are_columns() -> None:
    a = SparseDelta("norm", (4,), torch.tensor([0, 2]), torch.tensor([2.0, 3.0]))
    b = SparseDelta("norm", (4,), torch.tensor([2, 3]), torch.tensor([5.0, 1.0]))
    row = layer_orthogonality(a, b)
    assert row["awom"] == pytest.approx(15.0)  # the 1x1 product is the dot product
    assert row["awor"] == 0.0
    assert row["product_numel"] == 1


def test_adapter_level_aggregates_and_unshared_layers() -> None:
    gen = torch.Generator().manual_seed(7)
    a = SparseAdapter(
        "alpha",
        {
            "l0": random_delta("l0", (16, 8), 0.2, gen),
            "l1": random_delta("l1", (8, 16), 0.2, gen),
            "only_a": random_delta("only_a", (4, 4), 0.5, gen),
        },
    )
    b = SparseAdapter(
        "beta",
        {
            "l1": random_delta("l1", (8, 16), 0.2, gen),
            "l0": random_delta("l0", (16, 8), 0.2, gen),
            "only_b": random_delta("only_b", (4, 4), 0.5, gen),
        },
    )
    report = awom_awor(a, b)
    assert report["a"] == "alpha" and report["b"] == "beta"
    assert [row["name"] for row in report["layers"]] == ["l0", "l1"]
    assert report["only_in_a"] == ["only_a"]
    assert report["only_in_b"] == ["only_b"]
    refs = [dense_reference(a.deltas[n], b.deltas[n]) for n in ("l0", "l1")]
    agg = report["aggregate"]
    assert agg["common_layers"] == 2
    assert agg["awom_mean"] == pytest.approx((refs[0][0] + refs[1][0]) / 2)
    assert agg["awom_total"] == pytest.approx(math.hypot(refs[0][0], refs[1][0]))
    assert agg["awor_mean"] == pytest.approx((refs[0][1] + refs[1][1]) / 2)
    # pooled: l0 has an 8x8 product, l1 a 16x16 one
    zeros = refs[0][1] * 64 + refs[1][1] * 256
    assert agg["awor_pooled"] == pytest.approx(zeros / 320)
    overlaps = [set(a.deltas[n].indices.tolist()) & set(b.deltas[n].indices.tolist()) for n in ("l0", "l1")]
    overlaps = [len(shared) for shared in overlaps]
    assert agg["overlap"] == sum(overlaps)
    nnz_a = a.deltas["l0"].nnz + a.deltas["l1"].nnz
    assert agg["overlap_fraction_a"] == pytest.approx(sum(overlaps) / nnz_a)


def test_no_common_layers_gives_empty_aggregate() -> None:
    a = SparseAdapter("a", {"x": SparseDelta("x", (2, 2), torch.tensor([0]), torch.tensor([1.0]))})
    b = SparseAdapter("b", {"y": SparseDelta("y", (2, 2), torch.tensor([0]), torch.tensor([1.0]))})
    report = awom_awor(a, b)
    assert report["layers"] == []
    assert report["aggregate"]["awom_mean"] is None and report["aggregate"]["awor_mean"] is None
    assert report["aggregate"]["overlap"] == 0


def test_unequal_shapes_raise_naming_layer_and_shapes() -> None:
    a = SparseAdapter("a", {"w": SparseDelta("w", (4, 3), torch.tensor([0]), torch.tensor([1.0]))})
    b = SparseAdapter("b", {"w": SparseDelta("w", (3, 4), torch.tensor([0]), torch.tensor([1.0]))})
    expected = r"layer w has shape \[4, 3\] in adapter 'a' but \[3, 4\] in adapter 'b'"
    with pytest.raises(ShapeMismatchError, match=expected):
        awom_awor(a, b)


def test_rank_of_diagonal_delta_equals_its_size() -> None:
    n = 24
    delta = dense_delta("w", torch.diag(torch.arange(1.0, n + 1)))
    stats = layer_stats(delta)
    assert stats["rank"] == n
    assert stats["full_rank"] == n
    assert stats["rank_fraction"] == 1.0


def test_rank_matches_plain_matrix_rank() -> None:
    gen = torch.Generator().manual_seed(3)
    # rank-2 block plus empty rows/columns, and a rectangular random sparse matrix
    low = torch.zeros(30, 12)
    low[5:15, 2:8] = torch.randn(10, 2, generator=gen) @ torch.randn(2, 6, generator=gen)
    for dense in (low, random_delta("w", (40, 25), 0.05, gen).to_dense()):
        delta = dense_delta("w", dense)
        assert numerical_rank(delta) == int(torch.linalg.matrix_rank(dense))
    assert numerical_rank(dense_delta("w", low)) == 2
    empty = SparseDelta("w", (5, 5), torch.tensor([], dtype=torch.int64), torch.tensor([]))
    assert numerical_rank(empty) == 0


def test_layer_stats_fields() -> None:
    delta = SparseDelta("w", (10, 4), torch.tensor([0, 5, 39]), torch.tensor([1.0, 2.0, 3.0]))
    stats = layer_stats(delta, rank=False)
    assert stats["name"] == "w" and stats["shape"] == [10, 4]
    assert stats["nnz"] == 3 and stats["numel"] == 40
    assert stats["density"] == pytest.approx(0.075)
    assert stats["bytes"] == 3 * 2 + 3 * 4  # int16 indices, fp32 values
    assert stats["full_rank"] == 4
    assert stats["rank"] is None and stats["rank_fraction"] is None
    assert layer_stats(delta)["rank"] == 3  # entries in three distinct rows and columns


def test_adapter_stats_and_totals() -> None:
    adapter = SparseAdapter(
        "t",
        {
            "a": dense_delta("a", torch.eye(4)),
            "b": SparseDelta("b", (2, 8), torch.tensor([0, 1]), torch.tensor([1.0, 1.0])),
        },
    )
    rows = adapter_stats(adapter)
    assert [r["name"] for r in rows] == ["a", "b"]
    assert [r["rank"] for r in rows] == [4, 1]
    totals = stats_totals(rows)
    assert totals["layers"] == 2 and totals["nnz"] == 6 and totals["numel"] == 32
    assert totals["density"] == pytest.approx(6 / 32)
    assert totals["bytes"] == adapter.nbytes
    assert totals["rank_fraction_mean"] == pytest.approx((1.0 + 0.5) / 2)
    assert stats_totals(adapter_stats(adapter, rank=False))["rank_fraction_mean"] is None


def test_real_sized_layer_pair_is_fast() -> None:
    # SmolLM2-135M's MLP shapes at 1% density; the brief asks for < 50 ms per layer on CPU.
    gen = torch.Generator().manual_seed(11)
    for shape in ((1536, 576), (576, 1536)):
        a = random_delta("w", shape, 0.01, gen)
        b = random_delta("w", shape, 0.01, gen)
        layer_orthogonality(a, b)  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            layer_orthogonality(a, b)
            times.append(time.perf_counter() - start)
        # the median is compared with a loose bound: the test machine's two cores are shared
        assert sorted(times)[2] < 0.15, f"{shape}: median {sorted(times)[2] * 1000:.1f} ms"


def test_dense_orthogonality_agrees_with_the_sparse_metrics():
    gen = torch.Generator().manual_seed(0)

    def factors(name: str) -> LoraFactors:
        return LoraFactors(name, {"w": (torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen), 2.0)})

    a, b = factors("a"), factors("b")

    def as_sparse(lora: LoraFactors) -> SparseAdapter:
        dense = lora.delta("w").reshape(-1)
        return SparseAdapter(lora.name, {"w": SparseDelta("w", (5, 6), torch.arange(30), dense)}, "dense")

    reference = awom_awor(as_sparse(a), as_sparse(b))["aggregate"]
    got = dense_orthogonality(a, b)
    assert got["awom_total"] == pytest.approx(reference["awom_total"], rel=1e-5)
    assert got["awor_pooled"] == pytest.approx(reference["awor_pooled"]) and got["awor_pooled"] == 0.0
