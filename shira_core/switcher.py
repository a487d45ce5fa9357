"""The Switcher: applies and reverts weighted sets of sparse adapters by scatter overwrite.

At bind time every adaptable weight is moved into one flat buffer per (dtype, device), and each parameter
becomes a view of it. A whole adapter set is then one sorted index vector per buffer, so a switch is a single
``index_copy_`` however many layers it touches. A ScatterPlan keeps, for its indices, the original base values
and the adapted values; apply writes the adapted ones, revert writes the originals back, so the base weights
return bit for bit, whatever sequence of switches ran before.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from . import hugepages
from .delta import SparseAdapter
from .errors import FusionError, IndexRangeError, NonFiniteValueError, ShapeMismatchError, UnknownLayerError
from .params import adaptable, tied_aliases, unique_parameters

ALIGN = 64  # elements; keeps every weight view cache-line aligned inside the flat buffer

WeightedSet = Sequence[tuple[SparseAdapter, float]]


@dataclass(frozen=True)
class BoundWeight:
    """One adaptable weight as the Switcher holds it: a view at `offset` of flat buffer `group`."""

    name: str
    param: nn.Parameter
    group: int
    offset: int
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class _Group:
    buffer: torch.Tensor
    names: list[str] = field(default_factory=list)


@dataclass
class ScatterPart:
    group: int
    index: torch.Tensor  # int64, sorted, unique, on the group's device
    adapted: torch.Tensor  # W0[i] + sum(alpha * delta[i]) in the weight dtype
    original: torch.Tensor  # W0[i], saved once when the plan is built


@dataclass
class ScatterPlan:
    """A prepared adapter set: indices, adapted values and saved originals for each flat buffer."""

    label: str
    parts: list[ScatterPart]
    index_key: str

    @property
    def nnz(self) -> int:
        return sum(int(p.index.numel()) for p in self.parts)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.parts for t in (p.index, p.adapted, p.original))


@dataclass
class SwitchResult:
    """What one switch did: 'apply', 'transition', 'revert' or 'noop', the entries written and the time."""

    kind: str
    written: int
    seconds: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Switcher:
    """Binds to a model's weights and switches adapter sets in place.

    Args:
        model: any nn.Module; its adaptable weights are re-homed into flat buffers (same values, same
            Parameter objects, so optimizers and tied weights keep working).
        names: parameter names to make adaptable. Default: every floating-point parameter with 2+ dims.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None) -> None:
        self.model = model
        self._lock = threading.RLock()
        self._active: ScatterPlan | None = None
        params = unique_parameters(model)
        aliases = tied_aliases(model)
        if names is None:
            chosen = [n for n, p in params.items() if adaptable(p)]
        else:
            chosen = list(dict.fromkeys(aliases.get(n, n) for n in names))  # a tied weight is bound once
            unknown = [n for n in chosen if n not in params]
            if unknown:
                raise UnknownLayerError(f"model has no parameter(s) {unknown[:3]}")
        self._slots: dict[str, BoundWeight] = {}
        self._groups: list[_Group] = []
        self._params: dict[str, nn.Parameter] = {n: params[n] for n in chosen}
        self._bind(chosen, params)
        # Where each bound weight must keep living; checked before every write.
        self._homes = [
            (self._params[n], self._groups[s.group].buffer[s.offset :].data_ptr()) for n, s in self._slots.items()
        ]
        for alias, target in aliases.items():
            if target in self._slots:
                self._slots[alias] = self._slots[target]

    @torch.no_grad()
    def _bind(self, chosen: list[str], params: dict[str, nn.Parameter]) -> None:
        by_kind: dict[tuple[torch.dtype, torch.device], list[str]] = {}
        for name in chosen:
            p = params[name]
            by_kind.setdefault((p.dtype, p.device), []).append(name)
        for (dtype, device), names in by_kind.items():
            offsets, total = [], 0
            for name in names:
                offsets.append(total)
                total += -(-params[name].numel() // ALIGN) * ALIGN
            buffer = hugepages.zeros(total, dtype, device)  # huge pages where it can: decode streams it every step
            gid = len(self._groups)
            self._groups.append(_Group(buffer, list(names)))
            for name, off in zip(names, offsets, strict=True):
                p = params[name]
                view = buffer[off : off + p.numel()].view(p.shape)
                view.copy_(p.data)
                p.data = view
                self._slots[name] = BoundWeight(name, p, gid, off, tuple(p.shape))

    @property
    def names(self) -> list[str]:
        return list(self._params)

    @property
    def weights(self) -> list[BoundWeight]:
        """Every bound weight once (tied aliases left out), in binding order: where each lives in the buffers."""
        return [self._slots[name] for name in self._params]

    @property
    def active(self) -> ScatterPlan | None:
        return self._active

    def _check_bound(self) -> None:
        for param, home in self._homes:
            if param.data_ptr() != home:
                raise RuntimeError(
                    "the model's weights were moved or re-allocated after the Switcher bound them "
                    "(model.to()/half()?); create a new Switcher after moving the model"
                )

    def _slot(self, adapter: SparseAdapter, name: str, shape: tuple[int, ...]) -> BoundWeight:
        slot = self._slots.get(name)
        if slot is None:
            raise UnknownLayerError(
                f"adapter {adapter.name!r} targets {name}, which is not an adaptable weight of this model"
            )
        if slot.shape != tuple(shape):
            raise ShapeMismatchError(
                f"shape differs for layer {name} of adapter {adapter.name!r}: adapter says {list(shape)}, "
                f"base model has {list(slot.shape)}"
            )
        return slot

    @staticmethod
    def _check_range(adapter: SparseAdapter, name: str, indices: torch.Tensor, numel: int) -> None:
        # Flat buffers hold weights back to back: an index past its weight would land in the next one.
        if indices.numel() == 0:
            return
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= numel:
            raise IndexRangeError(
                f"index out of range: [{lo:,}, {hi:,}] but layer {name} of adapter {adapter.name!r} "
                f"has {numel:,} elements"
            )

    @torch.no_grad()
    def prepare(self, items: WeightedSet, label: str | None = None) -> ScatterPlan:
        """Builds the plan for W0 + sum(alpha_k * delta_k) over the union of the set's indices.

        Args:
            items: (adapter, alpha) pairs; overlapping indices add.
            label: a name for logs and metrics; defaults to "a:0.5+b:0.5".

        Returns:
            A ScatterPlan, valid for as long as this Switcher lives.
        """
        if not items:
            raise FusionError("an adapter set needs at least one adapter")
        chunks: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for adapter, alpha in items:
            if not isinstance(alpha, (int, float)) or alpha != alpha or abs(alpha) == float("inf"):
                raise FusionError(f"weight for adapter {adapter.name!r} must be a finite number, got {alpha!r}")
            for delta in adapter:
                slot = self._slot(adapter, delta.name, delta.shape)
                self._check_range(adapter, delta.name, delta.indices, slot.numel)
                device = self._groups[slot.group].buffer.device
                idx = delta.indices.to(device=device, dtype=torch.int64) + slot.offset
                vals = delta.values.to(device=device, dtype=torch.float32) * float(alpha)
                chunks.setdefault(slot.group, []).append((idx, vals))
        if label is None:
            label = "+".join(f"{a.name}:{w:g}" for a, w in items)
        parts = [self._build_part(gid, pieces, label) for gid, pieces in sorted(chunks.items())]
        digest = hashlib.blake2b(digest_size=16)
        for part in parts:
            digest.update(str(part.group).encode())
            digest.update(part.index.cpu().numpy().tobytes())
        return ScatterPlan(label, parts, digest.hexdigest())

    def _build_part(self, gid: int, pieces: list[tuple[torch.Tensor, torch.Tensor]], label: str) -> ScatterPart:
        buffer = self._groups[gid].buffer
        # Stable, so entries that overlap are summed in item order: the same set always gives the same bits.
        idx, order = torch.sort(torch.cat([p[0] for p in pieces]), stable=True)
        vals = torch.cat([p[1] for p in pieces])[order]
        if idx.numel() > 1 and bool((idx[1:] == idx[:-1]).any()):  # overlapping adapters (or tied weights) add
            idx, inverse = torch.unique_consecutive(idx, return_inverse=True)
            vals = torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device).index_add_(0, inverse, vals)
        with self._lock:
            original = buffer.index_select(0, idx)
            self._restore_originals(gid, idx, original)
        adapted = (original.float() + vals).to(buffer.dtype)
        if not bool(torch.isfinite(adapted).all()):
            bad = ~torch.isfinite(adapted)
            first = int(idx[bad][0])
            layer = next(n for n, s in self._slots.items() if s.group == gid and s.offset <= first < s.offset + s.numel)
            raise NonFiniteValueError(
                f"{int(bad.sum()):,} adapted weights overflow {buffer.dtype} (NaN or inf) for set {label!r}, "
                f"first in layer {layer} at flat index {first - self._slots[layer].offset:,}; lower the adapter weights"
            )
        return ScatterPart(gid, idx, adapted, original)

    def _restore_originals(self, gid: int, idx: torch.Tensor, values: torch.Tensor) -> None:
        # While a set is applied the buffer holds adapted values at its indices; take the saved originals.
        if self._active is None:
            return
        for part in self._active.parts:
            if part.group != gid or part.index.numel() == 0:
                continue
            pos = torch.searchsorted(part.index, idx).clamp_(max=part.index.numel() - 1)
            hit = part.index[pos] == idx
            values[hit] = part.original[pos[hit]]

    def _write(self, plan: ScatterPlan, adapted: bool) -> int:
        for part in plan.parts:
            src = part.adapted if adapted else part.original
            self._groups[part.group].buffer.index_copy_(0, part.index, src)
        return plan.nnz

    @torch.no_grad()
    def apply(self, target: WeightedSet | ScatterPlan) -> SwitchResult:
        """Makes `target` the active set: a plain apply from the base, or a transition from the active set."""
        plan = target if isinstance(target, ScatterPlan) else self.prepare(target)
        with self._lock:
            self._check_bound()
            start = time.perf_counter()
            current = self._active
            if current is plan:
                return SwitchResult("noop", 0, 0.0)
            written = 0
            if current is not None and current.index_key != plan.index_key:
                written += self._write(current, adapted=False)
            written += self._write(plan, adapted=True)
            self._active = plan
            self._sync()
            kind = "apply" if current is None else "transition"
            return SwitchResult(kind, written, time.perf_counter() - start)

    def transition(self, target: WeightedSet | ScatterPlan) -> SwitchResult:
        """Moves from the active set straight to `target` (same as apply; named for readability)."""
        return self.apply(target)

    @torch.no_grad()
    def revert(self) -> SwitchResult:
        """Writes the saved originals back; afterwards every weight equals the loaded base bit for bit."""
        with self._lock:
            current = self._active
            if current is None:
                return SwitchResult("noop", 0, 0.0)
            self._check_bound()
            start = time.perf_counter()
            written = self._write(current, adapted=False)
            self._active = None
            self._sync()
            return SwitchResult("revert", written, time.perf_counter() - start)

    def _sync(self) -> None:
        for group in self._groups:
            _sync(group.buffer.device)

    def memory(self) -> dict[str, int]:
        """Bytes held: the flat weight buffers, and the active plan's saved originals and index buffers."""
        plan = self._active
        originals = sum(p.original.numel() * p.original.element_size() for p in plan.parts) if plan else 0
        index = sum(p.index.numel() * p.index.element_size() for p in plan.parts) if plan else 0
        adapted = sum(p.adapted.numel() * p.adapted.element_size() for p in plan.parts) if plan else 0
        weights = sum(g.buffer.numel() * g.buffer.element_size() for g in self._groups)
        return {"weights": weights, "saved_originals": originals, "index_buffers": index, "adapted_values": adapted}
