"""Helpers for shira_core tests: random sparse adapters on a model, state snapshots, dense references."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pytest
import torch
from torch import nn

from shira_core import SparseAdapter, SparseDelta


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


def random_adapter(
    model: nn.Module,
    name: str,
    seed: int,
    layers: Iterable[str] | None = None,
    *,
    density: float = 0.1,
    pool: float = 0.25,
    scale: float = 0.05,
    dtype: torch.dtype = torch.float32,
) -> SparseAdapter:
    """A random adapter whose indices come from the first `pool` fraction of each weight, so adapters overlap.

    Args:
        model: gives the names and shapes.
        name: adapter name.
        seed: everything random is drawn from this seed.
        layers: parameter names to adapt (aliases allowed); default every adaptable weight.
        density: fraction of each weight that gets an entry.
        pool: entries are drawn from flat positions [0, pool * numel).
        scale: std of the delta values.
        dtype: dtype of the stored values.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for layer in layers if layers is not None else adaptable_names(model):
        shape = tuple(params[layer].shape)
        numel = params[layer].numel()
        span = max(2, int(pool * numel))
        k = max(1, min(span, int(density * numel)))
        idx = torch.sort(torch.randperm(span, generator=gen)[:k]).values
        vals = (torch.randn(k, generator=gen) * scale).to(dtype)
        deltas[layer] = SparseDelta(layer, shape, idx, vals)
    return SparseAdapter(name, deltas, mask="rand")


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


@pytest.fixture(scope="session")
def make_adapter() -> Callable[..., SparseAdapter]:
    """Factory: ``make_adapter(model, name, seed, layers=None, density=0.1, pool=0.25, scale=0.05, dtype=fp32)``."""
    return random_adapter
