"""Adapter statistics and the paper's orthogonality metrics, AWOM and AWOR (SHiRA, arXiv 2406.13175, §4.2).

Every weight is read as a matrix of shape (shape[0], rest): a Linear weight (out, in) as is, a 1-D weight as a
column. Sparse products go through torch.sparse so a 1% adapter pair never builds a dense m x m product.
dense_orthogonality gives the same metrics for low-rank (LoRA) adapters, whose ΔW is dense, from their factors.
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any

import torch

from .delta import SparseAdapter, SparseDelta
from .errors import ShapeMismatchError

if TYPE_CHECKING:
    from .baselines import LoraFactors

# matrix_rank's default tolerance scaled by the weight's full size, so dropping empty rows and columns
# before the SVD cannot change the answer.
_RANK_EPS = torch.finfo(torch.float32).eps


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view a weight is analysed as: (shape[0], product of the rest); a 1-D weight is a column."""
    if len(shape) == 0:
        return 1, 1
    return int(shape[0]), math.prod(shape[1:])


def numerical_rank(delta: SparseDelta) -> int:
    """torch.linalg.matrix_rank of the dense delta in fp32, with the default tolerance σ_max·max(n, m)·eps.

    All-zero rows and columns are dropped first (they do not change the rank), which makes structured
    masks cheap; the tolerance keeps the full weight's max(n, m) so the result equals the plain call's.
    """
    n, m = matrix_shape(delta.shape)
    idx = delta.indices.long().cpu()
    vals = delta.values.detach().cpu().float()
    keep = vals != 0
    idx, vals = idx[keep], vals[keep]
    if idx.numel() == 0:
        return 0
    rows, row_pos = torch.unique(idx // m, return_inverse=True)
    cols, col_pos = torch.unique(idx % m, return_inverse=True)
    dense = torch.zeros(rows.numel(), cols.numel(), dtype=torch.float32)
    dense[row_pos, col_pos] = vals
    if dense.shape[0] < dense.shape[1]:
        dense = dense.T  # the SVD is faster on tall matrices; the rank is the same
    return int(torch.linalg.matrix_rank(dense, rtol=max(n, m) * _RANK_EPS))


def layer_stats(delta: SparseDelta, rank: bool = True) -> dict[str, Any]:
    """Size, sparsity and (optionally) numerical rank of one layer's delta.

    Args:
        delta: the layer.
        rank: compute the numerical rank (one SVD of the dense delta; ~0.5 s for 1536x576 on CPU).

    Returns:
        name, shape, numel, nnz, density, bytes, full_rank (min of the 2-D view's sides), and with rank=True
        also rank and rank_fraction (rank / full_rank); both are None with rank=False.
    """
    n, m = matrix_shape(delta.shape)
    full = min(n, m)
    r = numerical_rank(delta) if rank else None
    return {
        "name": delta.name,
        "shape": list(delta.shape),
        "numel": delta.numel,
        "nnz": delta.nnz,
        "density": delta.density,
        "bytes": delta.nbytes,
        "full_rank": full,
        "rank": r,
        "rank_fraction": (r / full if full else 0.0) if r is not None else None,
    }


def adapter_stats(adapter: SparseAdapter, rank: bool = True) -> list[dict[str, Any]]:
    """layer_stats for every layer of the adapter, in its layer order; stats_totals() sums them up."""
    return [layer_stats(delta, rank=rank) for delta in adapter]


def stats_totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over adapter_stats rows.

    Returns:
        layers, numel, nnz, bytes, density (total nnz / total numel), and when ranks were computed
        rank_fraction_mean (unweighted mean of the per-layer rank fractions), else None.
    """
    numel = sum(r["numel"] for r in rows)
    nnz = sum(r["nnz"] for r in rows)
    fractions = [r["rank_fraction"] for r in rows if r["rank_fraction"] is not None]
    return {
        "layers": len(rows),
        "numel": numel,
        "nnz": nnz,
        "density": nnz / numel if numel else 0.0,
        "bytes": sum(r["bytes"] for r in rows),
        "rank_fraction_mean": sum(fractions) / len(fractions) if fractions else None,
    }


def _coo(delta: SparseDelta, transpose: bool) -> torch.Tensor:
    """The delta as a float64 sparse COO matrix (n x m), or its transpose (m x n)."""
    n, m = matrix_shape(delta.shape)
    idx = delta.indices.long().cpu()
    rows, cols = idx // m, idx % m
    vals = delta.values.detach().cpu().to(torch.float64)
    if transpose:
        coo = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (m, n), check_invariants=False)
        return coo.coalesce()  # transposing breaks the row-major order, coalesce re-sorts
    # sorted unique flat indices are already in coalesced (row-major) order
    return torch.sparse_coo_tensor(
        torch.stack([rows, cols]), vals, (n, m), is_coalesced=True, check_invariants=False
    )


def product_ata(a: SparseDelta, b: SparseDelta) -> torch.Tensor:
    """A1ᵀA2 as a coalesced float64 sparse COO tensor of shape (m, m)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        product = torch.sparse.mm(_coo(a, transpose=True), _coo(b, transpose=False))
    return product if product.is_coalesced() else product.coalesce()


def layer_orthogonality(a: SparseDelta, b: SparseDelta) -> dict[str, Any]:
    """AWOM, AWOR and index overlap of one layer's two deltas, which must have equal shapes.

    From the paper (§4.2):
      "Definition 1. Adapter Weight Orthogonality Magnitude (AWOM) is defined as the l2 norm of the
       product A1ᵀA2 for two sparse adapter weights A1, A2 ∈ R^{n×m}. AWOM enables us to understand how
       far the product A1ᵀA2 is from a zero matrix O ∈ R^{m×m}."
      "Definition 2. Adapter Weight Orthogonality Ratio (AWOR) is defined as the sparsity ratio of the
       product A1ᵀA2. Specifically, AWOR = [1 − ||A1ᵀA2||_0 / m²], where m² is #elements in A1ᵀA2."

    The l2 norm of the matrix is taken entrywise (Frobenius), and ||·||_0 counts entries whose value is
    non-zero, so a product entry whose terms cancel, or that only multiplies stored zeros, counts as zero.

    Returns:
        name, shape, awom, awor, product_nnz (||A1ᵀA2||_0), product_numel (m²), nnz_a, nnz_b,
        overlap (|Ia ∩ Ib|), overlap_fraction_a (overlap / nnz_a) and overlap_fraction_b (0.0 when empty).
    """
    if tuple(a.shape) != tuple(b.shape):
        raise ShapeMismatchError(
            f"layer {a.name} has shape {list(a.shape)} in the first adapter but {list(b.shape)} in the second"
        )
    m = matrix_shape(a.shape)[1]
    overlap = int(torch.isin(a.indices.long().cpu(), b.indices.long().cpu()).sum()) if a.nnz and b.nnz else 0
    return {
        "name": a.name,
        "shape": list(a.shape),
        **_product_metrics(product_ata(a, b).values(), m),
        "nnz_a": a.nnz,
        "nnz_b": b.nnz,
        "overlap": overlap,
        "overlap_fraction_a": overlap / a.nnz if a.nnz else 0.0,
        "overlap_fraction_b": overlap / b.nnz if b.nnz else 0.0,
    }


def _product_metrics(values: torch.Tensor, m: int) -> dict[str, Any]:
    """AWOM and AWOR of an m x m product A1ᵀA2 from its stored entries (all m² of them for a dense one)."""
    product_nnz = int((values != 0).sum())
    return {
        "awom": float(torch.linalg.vector_norm(values)) if values.numel() else 0.0,
        "awor": 1.0 - product_nnz / (m * m) if m else 1.0,
        "product_nnz": product_nnz,
        "product_numel": m * m,
    }


def awom_awor(a: SparseAdapter, b: SparseAdapter) -> dict[str, Any]:
    """AWOM, AWOR and index overlap for every layer both adapters change, plus aggregates.

    Aggregation over the common layers:
      awom_mean   unweighted mean of the per-layer AWOMs;
      awom_total  sqrt(Σ AWOM²), the l2 norm of all per-layer products taken together;
      awor_mean   unweighted mean of the per-layer AWORs (each layer counts once, whatever its size);
      awor_pooled 1 − Σ||A1ᵀA2||_0 / Σ m², every product entry counting once;
      overlap     Σ |Ia ∩ Ib|, with overlap_fraction_a / _b over the common layers' total nnz.

    Returns:
        {"a", "b": adapter names, "layers": per-layer dicts (layer_orthogonality), "only_in_a",
        "only_in_b": names of layers changed by one adapter only, "aggregate": the figures above,
        None-valued where there are no common layers}.

    Raises:
        ShapeMismatchError: a common layer has different shapes in the two adapters.
    """
    common = [name for name in a.deltas if name in b.deltas]
    for name in common:
        sa, sb = a.deltas[name].shape, b.deltas[name].shape
        if tuple(sa) != tuple(sb):
            raise ShapeMismatchError(
                f"layer {name} has shape {list(sa)} in adapter {a.name!r} "
                f"but {list(sb)} in adapter {b.name!r}"
            )
    layers = [layer_orthogonality(a.deltas[name], b.deltas[name]) for name in common]
    return {
        "a": a.name,
        "b": b.name,
        "layers": layers,
        "only_in_a": [name for name in a.deltas if name not in b.deltas],
        "only_in_b": [name for name in b.deltas if name not in a.deltas],
        "aggregate": _aggregate(layers),
    }


def _aggregate(layers: list[dict[str, Any]]) -> dict[str, Any]:
    nnz_a = sum(row["nnz_a"] for row in layers)
    nnz_b = sum(row["nnz_b"] for row in layers)
    overlap = sum(row["overlap"] for row in layers)
    return {
        **_product_aggregate(layers),
        "overlap": overlap,
        "overlap_fraction_a": overlap / nnz_a if nnz_a else 0.0,
        "overlap_fraction_b": overlap / nnz_b if nnz_b else 0.0,
    }


def _product_aggregate(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """common_layers and the AWOM/AWOR aggregates over per-layer rows (see awom_awor)."""
    count = len(layers)
    entries = sum(row["product_numel"] for row in layers)
    return {
        "common_layers": count,
        "awom_mean": sum(row["awom"] for row in layers) / count if count else None,
        "awom_total": math.sqrt(sum(row["awom"] ** 2 for row in layers)) if count else None,
        "awor_mean": sum(row["awor"] for row in layers) / count if count else None,
        "awor_pooled": 1.0 - sum(row["product_nnz"] for row in layers) / entries if entries else None,
    }


def dense_orthogonality(a: LoraFactors, b: LoraFactors) -> dict[str, Any]:
    """AWOM and AWOR of two low-rank adapters' ΔW over their common layers, with awom_awor's aggregates.

    ΔW1ᵀΔW2 = s1 s2 A1ᵀ (B1ᵀ B2) A2 is computed densely in float64; ||·||_0 counts its non-zero entries.
    A low-rank ΔW is dense, so every entry of a common layer is shared: overlap_fraction_a is 1.0.

    Args:
        a, b: the adapters as factors (baselines.LoraFactors: weight name -> (A, B, scaling)).

    Returns:
        common_layers, awom_mean, awom_total, awor_mean, awor_pooled (None where no layer is common) and
        overlap_fraction_a.
    """
    rows = []
    for w in a.factors:
        if w not in b.factors:
            continue
        a1, b1, s1 = (t.double() if isinstance(t, torch.Tensor) else t for t in a.factors[w])
        a2, b2, s2 = (t.double() if isinstance(t, torch.Tensor) else t for t in b.factors[w])
        product = (a1.T @ (b1.T @ b2) @ a2) * (s1 * s2)
        rows.append(_product_metrics(product, product.shape[0]))
    # a fused LoRA ΔW is dense: every entry of every layer changes
    return {**_product_aggregate(rows), "overlap_fraction_a": 1.0 if rows else 0.0}
