"""Correction plans: what one forward pass adds to which rows. The corrector makes one active around a pass.

- SegmentPlan (decode, PyTorch's products): runs of consecutive rows, each a Segment whose block-diagonal CSR
  matrices hold those rows' deltas; one sparse product per segment and layer (SGMV-like).
- KernelPlan (decode and prefill, the native kernel): each distinct delta and the rows that carry it; the kernel
  reads a delta's entries once per step for all its rows (BGMV-like, with rows grouped by delta).
- PrefillPlan (prefill, PyTorch's products): per layer, runs of rows that share one delta, one product each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .deltas import PackedDelta


@dataclass(eq=False)
class Segment:
    rows: int
    depth: int  # deltas per row, at most: the matrices have depth * rows block rows
    matrices: list[torch.Tensor | None]  # per layer: block-diagonal CSR [depth * rows * out, rows * in], or None
    nbytes: int = 0  # of the matrices' index and value arrays


@dataclass
class SegmentPlan:
    rows: int
    segments: tuple[tuple[int, Segment], ...]  # (first row, segment); rows outside every segment: no correction

    @property
    def nbytes(self) -> int:
        return sum(seg.nbytes for _, seg in self.segments)


@dataclass
class KernelPlan:
    """Each distinct delta's arrays, per layer, and the rows it applies to. It points into the deltas' own arrays,
    copies nothing, and holds the deltas so those arrays outlive it."""

    rows: int
    terms: torch.Tensor  # int64 [deltas, layers, 5]: the addresses of a delta's kernel arrays (0: none there)
    row_table: torch.Tensor  # int64: deltas + 1 offsets into the rest, then each delta's rows
    used: list[bool]  # per layer: whether any delta has entries there
    deltas: tuple[PackedDelta, ...]
    nbytes: int = 0  # it holds no copy of any delta


@dataclass
class PrefillPlan:
    rows: int
    products: list[list[tuple[int, int, torch.Tensor]]]  # per layer: (first row, end row, CSR matrix) per run


CorrectionPlan = SegmentPlan | KernelPlan | PrefillPlan
