"""The packed per-set delta: one adapter set's weights minus the base weights, per corrected Linear layer.

d_S = W_S - W0 is sparse (S's indices). It is built once per set straight from the set's ScatterPlan (adapted
minus original values; every plan saves the same W0 originals) and kept in the one form the corrector reads:
CSR for PyTorch's sparse products, or the native kernel's groups (see `grouped`).
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
    """One layer's entries in one form: CSR for PyTorch's products, or the native kernel's groups (the other
    form's fields are None, so a delta is not held twice)."""

    crow: torch.Tensor | None = None  # int32 [out + 1]
    col: torch.Tensor | None = None  # int32 [nnz]
    values: torch.Tensor | None = None  # [nnz]: adapted - original
    matrix: torch.Tensor | None = None  # the same three as a sparse CSR tensor [out, in], for prefill products
    counts: torch.Tensor | None = None  # int32 [out]: entries per row (crow's differences), for segments
    # For the native kernel: its ARRAYS arrays (see `grouped`), values last.
    groups: tuple[torch.Tensor, ...] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every array it holds (`matrix` shares the CSR three's storage)."""
        return [t for t in (self.crow, self.col, self.values, self.counts, *(self.groups or ())) if t is not None]


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
        values = [v for d in self.layers.values() for v in (d.values, d.groups[-1] if d.groups else None)]
        return sum(nbytes(v) for v in values if v is not None)

    def negated(self) -> PackedDelta:
        """-delta: new values, the same index arrays (shared, not copied)."""
        layers = {}
        for lid, d in self.layers.items():
            neg = LayerEntries(groups=(*d.groups[:-1], d.groups[-1].neg()) if d.groups is not None else None)
            if d.values is not None:
                neg.crow, neg.col, neg.counts, neg.values = d.crow, d.col, d.counts, d.values.neg()
                neg.matrix = csr(d.crow, d.col, neg.values, d.matrix.shape)
            layers[lid] = neg
        return PackedDelta(f"-{self.label}", layers, self.nnz)


@torch.no_grad()
def pack(plan: ScatterPlan, layout: LinearLayout, dtype: torch.dtype, native: bool) -> PackedDelta:
    """The plan's adapted weights minus the base weights, per Linear layer of `layout`.

    Args:
        plan: the set's scatter plan.
        layout: the corrected layers and where their weights sit in the Switcher's buffers.
        dtype: the dtype of the values.
        native: the native kernel's groups instead of the CSR form.

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
            if native:
                layers[lid] = LayerEntries(groups=grouped(row, col, vals, shape))
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


# The native kernel's layout (csrc/row_corrections.cpp): output rows by window of WINDOW (a thread's unit of
# work), and within a window, pieces of at most PIECE entries of one row, sorted by length and taken GROUP at a
# time, their entries interleaved. Cutting rows bounds the padding a group of uneven rows needs (a struct mask's
# full rows beside its column entries); sorting puts pieces of like length together.
WINDOW = 64
GROUP = 4
PIECE = 32
LANES = 8  # rows the kernel sums side by side: a delta is read once per step for every LANES of its rows
ARRAYS = 5  # the arrays `grouped` returns, and the addresses a plan holds per delta and layer


def _starts(counts: torch.Tensor) -> torch.Tensor:
    """Where each of consecutive runs of `counts` items begins."""
    return counts.cumsum(0) - counts


def grouped(row: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]
            ) -> tuple[torch.Tensor, ...]:
    """A layer's entries in the native kernel's layout: (windows, start, lane, col, values).

    windows int32 [n_windows + 1] is each window's first group; start int32 [groups + 1] each group's first entry;
    lane uint8 [groups * GROUP] each piece's row within its window (WINDOW: an empty lane); col (uint16 bits in
    int16) and values the entries, the j-th of each piece of a group in turn, padded with (0, 0.0) to the group's
    longest piece.
    """
    n_out, n_in = shape
    order = torch.argsort(row * n_in + col)  # by row, then column
    row, col, values = row[order], col[order], values[order]
    counts = torch.bincount(row, minlength=n_out)
    pieces = (counts + PIECE - 1) // PIECE  # per row
    piece_row = torch.repeat_interleave(torch.arange(n_out), pieces)
    first_piece = _starts(pieces)  # each row's first piece
    nth = torch.arange(piece_row.numel()) - first_piece[piece_row]  # a piece's place in its row
    length = torch.clamp(counts[piece_row] - nth * PIECE, max=PIECE)
    window = piece_row // WINDOW
    by_length = torch.argsort(window * (PIECE + 1) + PIECE - length, stable=True)  # window, then longest first
    place = torch.empty_like(by_length)
    place[by_length] = torch.arange(by_length.numel())  # each piece's position in that order
    n_windows = (n_out + WINDOW - 1) // WINDOW
    per_window = torch.bincount(window, minlength=n_windows)
    rank = place - _starts(per_window)[window]  # its position within its window
    group_count = (per_window + GROUP - 1) // GROUP
    windows = torch.zeros(n_windows + 1, dtype=torch.int64)
    windows[1:] = group_count.cumsum(0)
    group = windows[window] + rank // GROUP
    slot = rank % GROUP
    n_groups = int(windows[-1])
    width = torch.zeros(n_groups, dtype=torch.int64).scatter_reduce(0, group, length, "amax")
    start = torch.zeros(n_groups + 1, dtype=torch.int64)
    start[1:] = (width * GROUP).cumsum(0)
    lane = torch.full((n_groups * GROUP,), WINDOW, dtype=torch.uint8)
    lane[group * GROUP + slot] = (piece_row % WINDOW).to(torch.uint8)
    j = torch.arange(row.numel()) - _starts(counts)[row]  # each entry's place in its row
    piece = first_piece[row] + j // PIECE
    dest = start[group[piece]] + (j % PIECE) * GROUP + slot[piece]
    n = int(start[-1])
    cols = torch.zeros(n, dtype=torch.int16)
    cols[dest] = col.to(torch.int16)
    vals = torch.zeros(n, dtype=values.dtype)
    vals[dest] = values
    return windows.to(torch.int32), start.to(torch.int32), lane, cols, vals
