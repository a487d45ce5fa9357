"""What the row corrections cost per decode step, against what switching the merged set costs.

Both are in units of one delta entry corrected for one row in one step, so a caller can weigh a switch of the
merged set against the corrections it saves over the rows' remaining steps. Each way of correcting has its own
model: the native kernel reads a delta once per step for all its rows, PyTorch's products copy it per row.
"""

from __future__ import annotations

from collections.abc import Iterable

# PyTorch's products. With a merged set other than the base, every corrected row carries two deltas (its own and
# the merged set's negated) and the step runs a product, a sum over the two and an add instead of one fused
# product: ~1.35x the time per entry (8 rows, SmolLM2-135M, 2-core CPU: the base merged, 8.4M entries in 10.9 ms;
# a set merged, 10.6M entries in 18.7 ms).
DEPTH2_ENTRY_COST = 1.35
# Writing one weight entry when switching the merged set costs about this many entry-steps of correction (switch:
# 15-17 ms per 1.06M entries; correction: ~4 ms per 1.06M entries per decode step; both measured the same day,
# and both scale with memory speed).
SWITCH_ENTRY_COST = 4
# The native kernel reads a delta's entries once per step for all the m rows that carry it: about
# nnz * (NATIVE_TERM_READ + m) units of ~0.55 ns (~1.0 ns per entry for one row, ~0.6 per entry and row for
# eight; 2-core CPU, hot). A switch writes an entry in ~15 ns: NATIVE_SWITCH_ENTRY_COST units.
NATIVE_TERM_READ = 0.8
NATIVE_SWITCH_ENTRY_COST = 27


def step_cost(native: bool, corrected: Iterable[tuple[int, int]], merged_nnz: int) -> float:
    """One decode step's corrections. `corrected`: (entries of the set's delta, rows of the set) for each set
    other than the merged one; each of their rows also carries the merged set's negated delta, of `merged_nnz`
    entries (0 when the base is merged)."""
    corrected = list(corrected)
    if native:  # one term per corrected set, and the merged set's negated delta for every corrected row
        rows = sum(n for _, n in corrected)
        return sum(nnz * (NATIVE_TERM_READ + n) for nnz, n in corrected) + merged_nnz * (NATIVE_TERM_READ + rows)
    step = sum(n * (nnz + merged_nnz) for nnz, n in corrected)
    return step * (DEPTH2_ENTRY_COST if merged_nnz else 1)


def switch_cost(native: bool, entries: int) -> float:
    """Writing `entries` weight entries (a revert's and an apply's together)."""
    return entries * (NATIVE_SWITCH_ENTRY_COST if native else SWITCH_ENTRY_COST)
