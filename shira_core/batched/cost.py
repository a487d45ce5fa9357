"""What the row corrections cost per decode step, against what switching the merged set costs.

Both are in units of about one delta entry corrected in one step, so a caller can weigh a switch of the merged set
against the corrections it saves over the rows' remaining steps. Each way of correcting has its own model: the
native kernel reads a delta once per step for every eight of its rows, PyTorch's products copy it per row.
"""

from __future__ import annotations

from collections.abc import Iterable

from .deltas import LANES

# PyTorch's products. With a merged set other than the base, every corrected row carries two deltas (its own and
# the merged set's negated) and the step runs a product, a sum over the two and an add instead of one fused
# product: ~1.35x the time per entry (8 rows, SmolLM2-135M, 2-core CPU: the base merged, 8.4M entries in 10.9 ms;
# a set merged, 10.6M entries in 18.7 ms).
DEPTH2_ENTRY_COST = 1.35
# Writing one weight entry when switching the merged set costs about this many entry-steps of correction (switch:
# 15-17 ms per 1.06M entries; correction: ~4 ms per 1.06M entries per decode step; both measured the same day,
# and both scale with memory speed).
SWITCH_ENTRY_COST = 4
# The native kernel runs the corrected rows as the eight lanes of a vector: a delta costs about its entries once per
# step for up to eight of its rows, ~0.95 ns an entry in a decode step (2-core CPU, SmolLM2-135M, 8 rows over 5
# sets: ~5 ms a step, the entries streaming from memory), NATIVE_TERM_COST units of ~0.55 ns. A switch writes
# an entry in ~15 ns: NATIVE_SWITCH_ENTRY_COST units.
NATIVE_TERM_COST = 1.7
NATIVE_SWITCH_ENTRY_COST = 27


def step_cost(native: bool, corrected: Iterable[tuple[int, int]], merged_nnz: int) -> float:
    """One decode step's corrections. `corrected`: (entries of the set's delta, rows of the set) for each set
    other than the merged one; each of their rows also carries the merged set's negated delta, of `merged_nnz`
    entries (0 when the base is merged)."""
    corrected = list(corrected)
    if native:  # each corrected set's delta, and the merged set's negated delta for every corrected row
        rows = sum(n for _, n in corrected)
        visits = sum(nnz * -(-n // LANES) for nnz, n in corrected) + merged_nnz * -(-rows // LANES)
        return visits * NATIVE_TERM_COST
    step = sum(n * (nnz + merged_nnz) for nnz, n in corrected)
    return step * (DEPTH2_ENTRY_COST if merged_nnz else 1)


def switch_cost(native: bool, entries: int) -> float:
    """Writing `entries` weight entries (a revert's and an apply's together)."""
    return entries * (NATIVE_SWITCH_ENTRY_COST if native else SWITCH_ENTRY_COST)
