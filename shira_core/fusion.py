"""Fusing weighted sets of adapters into one SparseAdapter, so a fused set switches like any adapter."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .delta import SparseAdapter, SparseDelta
from .errors import FusionError

COMBINATIONS = ("linear", "ties")  # PEFT's combination_type names


def _check(items: Sequence[tuple[SparseAdapter, float]]) -> None:
    if not items:
        raise FusionError("fusion needs at least one (adapter, weight) pair")
    shapes: dict[str, tuple[int, ...]] = {}
    for adapter, alpha in items:
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise FusionError(f"weight for adapter {adapter.name!r} must be a finite number, got {alpha!r}")
        for d in adapter:
            if shapes.setdefault(d.name, d.shape) != d.shape:
                raise FusionError(
                    f"adapters disagree on the shape of layer {d.name}: {list(shapes[d.name])} vs {list(d.shape)} "
                    f"(adapter {adapter.name!r})"
                )


def _layer_pieces(items: Sequence[tuple[SparseAdapter, float]]) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer, the (int64 indices, alpha-scaled fp32 values) of each adapter that touches it."""
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for adapter, alpha in items:
        for d in adapter:
            out.setdefault(d.name, []).append((d.indices.long(), d.values.float() * float(alpha)))
    return out


def _union(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sorted union of the indices, the values lined up with it, and each value's slot in the union."""
    idx = torch.cat([p[0] for p in pieces])
    vals = torch.cat([p[1] for p in pieces])
    idx, order = torch.sort(idx, stable=True)
    union, inverse = torch.unique_consecutive(idx, return_inverse=True)
    return union, vals[order], inverse


def _merged(name: str, items: Sequence[tuple[SparseAdapter, float]], mask: str, description: str) -> SparseAdapter:
    first = items[0][0]
    return SparseAdapter(name, {}, mask, first.base_fingerprint, description)


def fuse_linear(items: Sequence[tuple[SparseAdapter, float]], name: str = "fused") -> SparseAdapter:
    """W0 + sum(alpha_k * delta_k): a weighted sum where overlapping indices add.

    Args:
        items: (adapter, alpha) pairs.
        name: the fused adapter's name.

    Returns:
        One SparseAdapter whose deltas are the weighted sums.
    """
    _check(items)
    out = _merged(name, items, "fused-linear", " + ".join(f"{w:g}*{a.name}" for a, w in items))
    shapes = {d.name: d.shape for a, _ in items for d in a}
    for layer, pieces in _layer_pieces(items).items():
        union, vals, inverse = _union(pieces)
        summed = torch.zeros(union.numel(), dtype=torch.float32, device=union.device).index_add_(0, inverse, vals)
        out.deltas[layer] = SparseDelta(layer, shapes[layer], union, summed)
    return out


def _trim(values: torch.Tensor, keep: float) -> torch.Tensor:
    """Mask of the top `keep` fraction of |values|."""
    k = max(1, math.ceil(keep * values.numel())) if values.numel() else 0
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k:
        mask[torch.topk(values.abs(), k, sorted=False).indices] = True
    return mask


def fuse_ties(items: Sequence[tuple[SparseAdapter, float]], name: str = "fused", keep: float = 0.5) -> SparseAdapter:
    """TIES merging: trim each alpha*delta to its largest `keep` fraction, elect a sign per entry by the
    summed mass, then average the entries that agree with the elected sign.

    Args:
        items: (adapter, alpha) pairs.
        name: the fused adapter's name.
        keep: fraction of each adapter's entries kept by the trim, in (0, 1].

    Returns:
        One SparseAdapter.
    """
    _check(items)
    if not 0 < keep <= 1:
        raise FusionError(f"ties keep fraction must be in (0, 1], got {keep}")
    out = _merged(name, items, "fused-ties", " + ".join(f"{w:g}*{a.name}" for a, w in items) + f" (ties keep={keep})")
    shapes = {d.name: d.shape for a, _ in items for d in a}
    for layer, pieces in _layer_pieces(items).items():
        trimmed = [(i[m], v[m]) for i, v in pieces for m in [_trim(v, keep)]]
        union, vals, inverse = _union(trimmed)
        n = union.numel()
        zeros = torch.zeros(n, dtype=torch.float32, device=union.device)  # on the adapters' device
        elected = torch.sign(zeros.clone().index_add_(0, inverse, vals))
        agree = (torch.sign(vals) == elected[inverse]) & (vals != 0)
        total = zeros.clone().index_add_(0, inverse, vals * agree)
        count = zeros.clone().index_add_(0, inverse, agree.float())
        keep_rows = count > 0
        merged = total[keep_rows] / count[keep_rows]
        out.deltas[layer] = SparseDelta(layer, shapes[layer], union[keep_rows], merged)
    return out


def fuse(
    items: Sequence[tuple[SparseAdapter, float]], combination_type: str = "linear", name: str = "fused",
    keep: float = 0.5, *, merge: str | None = None,
) -> SparseAdapter:
    """Dispatches to fuse_linear or fuse_ties (with its trim fraction `keep`) by PEFT's combination_type name.
    `merge` is its old name, still accepted."""
    combination_type = merge or combination_type
    if combination_type == "linear":
        return fuse_linear(items, name)
    if combination_type == "ties":
        return fuse_ties(items, name, keep)
    raise FusionError(f"unknown merge {combination_type!r}; use one of {', '.join(COMBINATIONS)} (combination_type)")
