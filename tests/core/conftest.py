"""Helpers for shira_core tests: state snapshots and dense references (random adapters: tests/random_adapters.py)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import nn

from shira_core import SparseAdapter


def adaptable_names(model: nn.Module) -> list[str]:
    """Every floating 2-D+ parameter name, aliases (tied weights) included."""
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p.dtype.is_floating_point and p.dim() >= 2]


def alias_targets(model: nn.Module) -> dict[str, str]:
    """name -> the first name of the same Parameter (identity for untied weights)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(p), name)
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Clones of every parameter (under every name) and buffer."""
    out = {"param:" + n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
    out.update({"buffer:" + n: b.detach().clone() for n, b in model.named_buffers()})
    return out


def assert_matches_snapshot(model: nn.Module, snap: dict[str, torch.Tensor]) -> None:
    """Every parameter and buffer is torch.equal (same dtype, shape, values) to the snapshot."""
    now = snapshot(model)
    assert now.keys() == snap.keys()
    for key, ref in snap.items():
        got = now[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        if not torch.equal(got, ref):
            diff = (got.float() - ref.float()).abs()
            pytest.fail(f"{key} differs from the snapshot at {int((diff > 0).sum())} entries, max {float(diff.max())}")


def dense_expected(
    model: nn.Module, base: dict[str, torch.Tensor], items: Sequence[tuple[SparseAdapter, float]]
) -> dict[str, torch.Tensor]:
    """W0 + sum(alpha * delta) per unique weight, summed densely in fp32 in item order, cast to the weight dtype."""
    targets = alias_targets(model)
    sums: dict[str, torch.Tensor] = {}
    for adapter, alpha in items:
        for delta in adapter:
            target = targets[delta.name]
            acc = sums.setdefault(target, torch.zeros(delta.shape, dtype=torch.float32))
            acc += delta.to_dense(torch.float32) * float(alpha)
    out = {}
    for name, w0 in base.items():
        out[name] = (w0.float() + sums[name]).to(w0.dtype) if name in sums else w0
    return out


def unique_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> parameter, tied ones once under their first name."""
    targets = alias_targets(model)
    return {n: p.detach() for n, p in model.named_parameters(remove_duplicate=False) if targets[n] == n}
