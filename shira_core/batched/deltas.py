"""The packed per-set delta: one adapter set's weights minus the base weights, per corrected Linear layer.

d_S = W_S - W0 is sparse (S's indices). It is built once per set straight from the set's ScatterPlan (adapted
minus original values; every plan saves the same W0 originals) and kept in the one form the corrector reads:
CSR for PyTorch's sparse products, or the native kernel's blocks (by block of output rows, by column within a
block).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..errors import ShiraError
from ..switcher import ScatterPlan
from .layout import LinearLayout


class UnbatchableSetError(ShiraError):
    """A set cannot share a batch with other sets: it changes a weight that is not (only) an nn.Linear weight."""


@dataclass
class LayerEntries:
    """One layer's entries in one form: CSR for PyTorch's products, or the native kernel's blocks (the other
    form's fields are None, so a delta is not held twice)."""

    crow: torch.Tensor | None = None  # int32 [out + 1]
    col: torch.Tensor | None = None  # int32 [nnz]
    values: torch.Tensor | None = None  # [nnz]: adapted - original
    matrix: torch.Tensor | None = None  # the same three as a sparse CSR tensor [out, in], for prefill products
    counts: torch.Tensor | None = None  # int32 [out]: entries per row (crow's differences), for segments
    # For the native kernel: the entries block by block of output rows, by column within a block (start
    # int32 [blocks + 1], the row within the block uint8, the column as uint16 bits in int16, the value).
    blocked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every array it holds (`matrix` shares the CSR three's storage)."""
        return [t for t in (self.crow, self.col, self.values, self.counts, *(self.blocked or ())) if t is not None]


@dataclass(eq=False)
class PackedDelta:
    """One adapter set's delta from the base, per corrected Linear layer (layer id -> its entries)."""

    label: str
    layers: dict[int, LayerEntries]
    nnz: int
    addresses: torch.Tensor | None = None  # int64 [layers, 4] for the native kernel, built at its first plan

    @property
    def nbytes(self) -> int:
        return sum(nbytes(t) for d in self.layers.values() for t in d.tensors())

    @property
    def entry_bytes(self) -> int:
        """Bytes of the column indices and values that a segment copies once per row carrying this delta (0
        for the native kernel's, which its plans point into)."""
        return sum(nbytes(d.col) + nbytes(d.values) for d in self.layers.values() if d.col is not None)

    @property
    def pointer_bytes(self) -> int:
        """Bytes of the row pointers (one block's worth in a segment; 0 for the native kernel's)."""
        return sum(nbytes(d.crow) for d in self.layers.values() if d.crow is not None)

    @property
    def value_bytes(self) -> int:
        """Bytes of the values alone: what a negated copy holds of its own."""
        values = [v for d in self.layers.values() for v in (d.values, d.blocked[3] if d.blocked else None)]
        return sum(nbytes(v) for v in values if v is not None)

    def negated(self) -> PackedDelta:
        """-delta: new values, the same index arrays (shared, not copied)."""
        layers = {}
        for lid, d in self.layers.items():
            neg = LayerEntries(blocked=(*d.blocked[:3], d.blocked[3].neg()) if d.blocked is not None else None)
            if d.values is not None:
                neg.crow, neg.col, neg.counts, neg.values = d.crow, d.col, d.counts, d.values.neg()
                neg.matrix = csr(d.crow, d.col, neg.values, d.matrix.shape)
            layers[lid] = neg
        return PackedDelta(f"-{self.label}", layers, self.nnz)


@torch.no_grad()
def pack(plan: ScatterPlan, layout: LinearLayout, dtype: torch.dtype, block: int | None) -> PackedDelta:
    """The plan's adapted weights minus the base weights, per Linear layer of `layout`.

    Args:
        plan: the set's scatter plan.
        layout: the corrected layers and where their weights sit in the Switcher's buffers.
        dtype: the dtype of the values.
        block: the native kernel's block of output rows, or None for the CSR form.

    Raises:
        UnbatchableSetError: the plan changes a weight that is not only used as an nn.Linear weight.
    """
    layers: dict[int, LayerEntries] = {}
    for part in plan.parts:
        starts, lids, names = layout.spans[part.group]
        index = part.index.cpu()
        seg = torch.searchsorted(starts, index, right=True) - 1
        which, counts = torch.unique_consecutive(seg, return_counts=True)
        values = part.adapted.to(dtype) - part.original.to(dtype)
        pos = 0
        for s, n in zip(which.tolist(), counts.tolist(), strict=True):
            lid, name = lids[s], names[s]
            if lid < 0:
                raise UnbatchableSetError(
                    f"set {plan.label!r} changes {name}, which is not only an nn.Linear weight; "
                    "it cannot share a batch with other sets"
                )
            layer = layout.layers[lid]
            local = index[pos : pos + n] - layout.offsets[name]
            row, col = local // layer.in_features, local % layer.in_features
            vals = values[pos : pos + n]
            shape = (layer.out_features, layer.in_features)
            if block is not None:
                layers[lid] = LayerEntries(blocked=blocked(row, col, vals, shape, block))
            else:
                crow = torch.zeros(layer.out_features + 1, dtype=torch.int64)
                crow[1:] = torch.bincount(row, minlength=layer.out_features).cumsum(0)
                device = part.index.device
                crow32, col32 = crow.to(device, torch.int32), col.to(device, torch.int32)
                layers[lid] = LayerEntries(crow32, col32, vals, csr(crow32, col32, vals, shape), crow32.diff())
            pos += n
    return PackedDelta(plan.label, layers, plan.nnz)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and the kernels are what we want
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


def blocked(row: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
            block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's entries in the native kernel's layout: by block of `block` output rows, then by column."""
    n_blocks = (shape[0] + block - 1) // block
    which = row // block
    order = torch.argsort(which * shape[1] + col, stable=True)
    start = torch.zeros(n_blocks + 1, dtype=torch.int64)
    start[1:] = torch.bincount(which, minlength=n_blocks).cumsum(0)
    local = (row % block)[order].to(torch.uint8)
    return start.to(torch.int32), local, col[order].to(torch.int16), values[order].contiguous()
