"""Random SHiRA adapters for tests, one implementation for every test tree.

tests/conftest.py puts this folder on sys.path (pytest's default import mode), so tests/core, tests/cli,
tests/service and tests/integration all import it as ``from random_adapters import random_adapter``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.fingerprint import BaseFingerprint
from shira_core.masks import rand_mask
from shira_core.models import linear_weight_names


def random_adapter(
    model: nn.Module,
    name: str,
    seed: int,
    layers: Iterable[str] | None = None,
    *,
    density: float = 0.1,
    std: float = 0.05,
    pool: float = 0.25,
    mask_seed_step: int | None = None,
    dtype: torch.dtype = torch.float32,
    fingerprint: bool = False,
    description: str = "",
) -> SparseAdapter:
    """A random adapter with mask "rand": per layer, sorted flat indices and values ~ N(0, std).

    Indices come in one of two ways. By default one generator seeded `seed` draws each layer's indices from
    the first `pool` fraction of the weight, then its values, layer after layer; so adapters overlap, and
    pool=1.0 draws from the whole weight. With `mask_seed_step`, layer i's indices are
    shira_core.masks.rand_mask(seed=seed * mask_seed_step + i) over the whole weight (`pool` unused) and the
    generator draws only the values.

    Args:
        model: gives the names and shapes (and the fingerprint).
        name: adapter name.
        seed: everything random is drawn from this seed.
        layers: parameter names to adapt (aliases allowed); default every nn.Linear weight but lm_head
            (shira_core.models.linear_weight_names).
        density: fraction of each weight that gets an entry.
        std: standard deviation of the values.
        pool: indices are drawn from flat positions [0, pool * numel).
        mask_seed_step: per-layer rand_mask seeds, as above; None for the shared generator.
        dtype: dtype of the stored values.
        fingerprint: record the model's BaseFingerprint (probes of the adapted layers) in the adapter.
        description: the adapter's description.

    Returns:
        The adapter.
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for i, layer in enumerate(layers if layers is not None else linear_weight_names(model)):
        weight = params[layer]
        numel = weight.numel()
        if mask_seed_step is None:
            span = max(2, int(pool * numel))
            k = max(1, min(span, int(density * numel)))
            idx = torch.sort(torch.randperm(span, generator=gen)[:k]).values
        else:
            idx = rand_mask(weight, density, seed=seed * mask_seed_step + i).cpu()
        values = (torch.randn(idx.numel(), generator=gen) * std).to(dtype)
        deltas[layer] = SparseDelta(layer, tuple(weight.shape), idx, values)
    base = BaseFingerprint.of(model).to_dict(deltas) if fingerprint else None
    return SparseAdapter(name, deltas, "rand", base, description)
