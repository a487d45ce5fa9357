"""A compact fingerprint of a base model, so an adapter built for another model is refused.

The structure part (names and shapes) must match exactly, and every adapted weight must be adaptable
(params.adaptable: floating point, 2 or more dimensions). The value part is a per-tensor probe, the mean
absolute value over fixed positions, compared with a tolerance: the same checkpoint loaded in fp32, fp16 or
bf16 must still match, while a different checkpoint of the same architecture must not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .delta import SparseAdapter
from .errors import BaseModelMismatchError, NotAdaptableError, ShapeMismatchError, UnknownLayerError
from .metadata import check_fingerprint
from .params import ADAPTABLE_RULE, adaptable_names, tied_aliases, unique_parameters  # also imported from here

PROBE_POINTS = 256
PROBE_RTOL = 0.02


def _probe(tensor: torch.Tensor) -> float:
    flat = tensor.detach().reshape(-1)
    step = max(flat.numel() // PROBE_POINTS, 1)
    return float(flat[::step][:PROBE_POINTS].float().abs().mean())


@dataclass(frozen=True)
class BaseFingerprint:
    """Names, shapes, dtype and value probes of a base model's parameters.

    `aliases` maps the other names of tied parameters (lm_head.weight) to the name they are listed under.
    `adaptable` names the weights an adapter may change; None (a fingerprint built from shapes alone, without
    dtypes) takes every weight of 2 or more dimensions.
    """

    shapes: dict[str, tuple[int, ...]]
    probes: dict[str, float]
    dtype: str
    aliases: dict[str, str] = field(default_factory=dict)
    adaptable: frozenset[str] | None = None

    @classmethod
    def of(cls, model: nn.Module) -> BaseFingerprint:
        params = unique_parameters(model)
        shapes = {k: tuple(p.shape) for k, p in params.items()}
        probes = {k: _probe(p) for k, p in params.items()}
        dtypes = sorted({str(p.dtype).replace("torch.", "") for p in params.values()})
        return cls(shapes, probes, ",".join(dtypes), tied_aliases(model), frozenset(adaptable_names(model)))

    def is_adaptable(self, name: str) -> bool:
        """Whether an adapter may change the weight `name` (its first name, not an alias)."""
        if self.adaptable is None:
            return len(self.shapes[name]) >= 2
        return name in self.adaptable

    @property
    def structure_hash(self) -> str:
        text = json.dumps(sorted((k, list(v)) for k, v in self.shapes.items()))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def id(self) -> str:
        """A short display id: structure plus coarsely rounded probes."""
        rounded = [f"{self.probes[k]:.2g}" for k in sorted(self.probes)]
        return hashlib.sha256((self.structure_hash + ",".join(rounded)).encode()).hexdigest()[:16]

    def to_dict(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """Serialisable form. With `names`, only probes for those weights are kept (smaller headers)."""
        keep = sorted(self.probes) if names is None else sorted(set(names) & set(self.probes))
        return {
            "id": self.id,
            "structure": self.structure_hash,
            "dtype": self.dtype,
            # Significant digits, not decimals: a weight of mean |w| 1e-5 must survive the rounding.
            "probes": {k: float(f"{self.probes[k]:.6g}") for k in keep},
        }

    def check(self, adapter: SparseAdapter) -> None:
        """Raises if the adapter names unknown weights, disagrees on a shape, or was built for another base."""
        for delta in adapter:
            name = self.aliases.get(delta.name, delta.name)
            if name not in self.shapes:
                raise UnknownLayerError(
                    f"adapter {adapter.name!r} targets {delta.name}, which the base model does not have "
                    f"({len(self.shapes)} parameters, e.g. {next(iter(self.shapes))})"
                )
            if tuple(self.shapes[name]) != tuple(delta.shape):
                raise ShapeMismatchError(
                    f"shape differs for layer {delta.name} of adapter {adapter.name!r}: adapter says "
                    f"{list(delta.shape)}, base model has {list(self.shapes[name])}"
                )
            if not self.is_adaptable(name):
                raise NotAdaptableError(
                    f"adapter {adapter.name!r} changes layer {delta.name} of shape {list(self.shapes[name])}, "
                    f"which cannot be switched: {ADAPTABLE_RULE}; drop that layer from the adapter"
                )
        # Set in code rather than read from a file, it has not been through the parser's checks.
        theirs = check_fingerprint(adapter.base_fingerprint, f"adapter {adapter.name!r}")
        if not theirs:
            return
        if theirs.get("structure") != self.structure_hash:
            raise BaseModelMismatchError(
                f"adapter {adapter.name!r} was built for base {theirs.get('id')} with a different architecture "
                f"(structure {theirs.get('structure')} vs {self.structure_hash}); "
                "load it on the model it was trained on"
            )
        if not self.probes:  # a shapes-only fingerprint (built without weights) cannot compare values
            return
        for name, value in (theirs.get("probes") or {}).items():
            ours = self.probes.get(name)
            if ours is None or abs(ours - value) > PROBE_RTOL * max(abs(ours), abs(value), 1e-12):
                raise BaseModelMismatchError(
                    f"adapter {adapter.name!r} was built for base {theirs.get('id')}, not this one ({self.id}): "
                    f"weight {name} has mean |w| {ours} here vs {value} there"
                )
