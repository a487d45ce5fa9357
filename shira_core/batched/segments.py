"""Building segments: block-diagonal CSR matrices that correct a run of consecutive rows in one product.

Block row v = r * depth + k holds the k-th delta of row r; its columns are row r's inputs, so one product per
layer corrects every row of the run (SGMV-like, in LoRAX's words a segment of rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .deltas import PackedDelta, csr, nbytes
from .layout import LinearLayer
from .plans import Segment


def build_segment(terms: tuple[tuple[PackedDelta, ...], ...], layers: Sequence[LinearLayer],
                  no_entries: Sequence[torch.Tensor]) -> Segment:
    """The segment of rows whose deltas are `terms` (one tuple per row; empty: no correction for that row).
    `no_entries[lid]`: zeros of the layer's out_features (int32), for rows without entries there."""
    rows, depth = len(terms), max((len(t) for t in terms), default=0)
    blocks = [t[k] if k < len(t) else None for t in terms for k in range(depth)]
    matrices: list[torch.Tensor | None] = []
    total = 0
    for lid, layer in enumerate(layers):
        if not any(d is not None and lid in d.layers for d in blocks):
            matrices.append(None)
            continue
        counts, cols, values = [no_entries[lid][:1]], [], []  # crow = cumsum of [0, entries per row]
        for v, d in enumerate(blocks):
            part = d.layers.get(lid) if d is not None else None
            if part is None:
                counts.append(no_entries[lid])
                continue
            counts.append(part.counts)
            cols.append(part.col + (v // depth) * layer.in_features)
            values.append(part.values)
        crow, col, vals = torch.cat(counts).cumsum(0, dtype=torch.int32), torch.cat(cols), torch.cat(values)
        total += nbytes(crow) + nbytes(col) + nbytes(vals)
        shape = (len(blocks) * layer.out_features, rows * layer.in_features)
        matrices.append(csr(crow, col, vals, shape))
    return Segment(rows, depth, matrices, total)


def cut_segment(seg: Segment, first: int, rows: int, layers: Sequence[LinearLayer]) -> Segment:
    """Rows [first, first + rows) of a segment as a segment of their own: the values are views of the
    segment's, the column indices a shifted copy (a third of a build's bytes)."""
    matrices: list[torch.Tensor | None] = []
    total = 0
    for lid, matrix in enumerate(seg.matrices):
        if matrix is None:
            matrices.append(None)
            continue
        layer = layers[lid]
        lo, hi = first * seg.depth * layer.out_features, (first + rows) * seg.depth * layer.out_features
        crow = matrix.crow_indices()[lo : hi + 1]
        k0, k1 = int(crow[0]), int(crow[-1])
        crow = crow - k0
        col = matrix.col_indices()[k0:k1] - first * layer.in_features
        vals = matrix.values()[k0:k1]
        total += nbytes(crow) + nbytes(col) + nbytes(vals)
        matrices.append(csr(crow, col, vals, (hi - lo, rows * layer.in_features)))
    return Segment(rows, seg.depth, matrices, total)
