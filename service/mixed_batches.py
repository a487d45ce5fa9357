"""Mixed-set batches: rows of several adapter sets decode together while one set (the merged set) is in the weights.

The worker's side of shira_core.batched (multi-adapter batching, in vLLM's and LoRAX's words): it decides which
sets may share a batch, picks the merged set before each forward pass (switching the weights when that pays),
and hands the generator the correction plan for each pass. Rows of the merged set cost nothing extra; every
other row adds its set's delta, and the merged set's delta negated when that is not the base: on the CPU in the
native kernel, which reads each delta once for all its rows, else in one block-diagonal sparse product per layer.

Dependencies point down: the worker (service.engine_worker) hands this module each set's scatter plan and delta
as data; this module switches the weights through the MergedSet it shares with the worker and calls nothing
above it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

from shira_core.batched import PackedDelta, RowCorrector
from shira_core.switcher import ScatterPlan

from . import metrics
from .batch_generation import Row
from .merged_set import MergedSet
from .types import BASE_KEY

log = logging.getLogger(__name__)

# A corrected row costs about CORRECTION_ENTRY_COST dense weights' worth of forward-pass time per delta entry
# (measured while serving on a 2-core CPU, SmolLM2-135M fp32, 8 rows: ~1.8 ns per sparse entry per decode step,
# ~0.08 ns per dense weight and row; on a day the VM ran 2x slower, 4 and 0.26 ns). A set whose delta would cost
# more than one dense forward pass per step runs in a batch of its own.
CORRECTION_ENTRY_COST = 20


class MixedBatches:
    """The merged-set choice and the correction plans of one worker.

    The worker hands it each set it may mix as data (`add`: the set's scatter plan and its delta).

    Args:
        corrector: the RowCorrector bound to the model and the Switcher.
        merged: the set in the weights, and the switches that change it.
        dense_params: the model's adaptable Linear weights, for the limit on a corrected set's size.
        plan_bytes: the most bytes a decode plan may hold. The plan copies every corrected row's deltas, so it
            grows with the batch (16 rows of a 1%-dense adapter on a 1.7B model: ~2 GB); rows that would push it
            past this wait for room (`fits`).
    """

    def __init__(self, corrector: RowCorrector, merged: MergedSet, dense_params: int,
                 plan_bytes: int = 256 * 2**20) -> None:
        self.corrector = corrector
        self.merged = merged
        self.max_corrected_nnz = dense_params // CORRECTION_ENTRY_COST
        self.plan_bytes = plan_bytes
        self.peak_plan_bytes = 0
        self._bytes: dict[Hashable, tuple[int, int]] = {BASE_KEY: (0, 0)}  # a set's (entry, row pointer) bytes
        self._plans: dict[Hashable, ScatterPlan | None] = {BASE_KEY: None}
        self._deltas: dict[Hashable, PackedDelta] = {BASE_KEY: PackedDelta("base", {}, 0)}  # relative to the base
        self._negated: dict[Hashable, PackedDelta] = {}  # merged key -> -d_merged
        self._refused: set[Hashable] = set()
        self.merged_switches = 0

    def known(self, key: Hashable) -> bool | None:
        """Whether rows of this set may share a batch with other sets; None until the set is added or refused."""
        if key in self._deltas:
            return True
        return False if key in self._refused else None

    def add(self, key: Hashable, plan: ScatterPlan, delta: PackedDelta) -> bool:
        """Takes a set's scatter plan and delta; False (and refused from then on) when its delta is too large to
        correct rows by, so it runs in batches of its own."""
        if delta.nnz > self.max_corrected_nnz:
            self.refuse(key, f"{delta.nnz:,} entries, over the limit of {self.max_corrected_nnz:,} for corrected rows")
            return False
        self._plans[key], self._deltas[key] = plan, delta
        self._bytes[key] = (delta.entry_bytes, delta.pointer_bytes)
        return True

    def refuse(self, key: Hashable, reason: Any) -> None:
        log.info("set %s runs in batches of its own: %s", key, reason)
        self._refused.add(key)

    def fits(self, keys: Sequence[Hashable]) -> bool:
        """Whether rows of these (mixable) sets can decode together within the plan budget under some merged set."""
        counts = Counter(keys)
        if len(counts) <= 1:
            return True
        return min(self._plan_bytes(counts, h) for h in self._candidates(counts)) <= self.plan_bytes

    def _plan_bytes(self, counts: Counter, target: Hashable) -> int:
        """An upper bound on the decode plan's bytes for rows of these sets with `target` merged: each corrected row's
        entries (its own delta's, and the merged set's negated), and row pointers for every row at the plan's depth.
        Deltas for the native kernel report none of these bytes: its plans point into them and copy nothing."""
        merged_entries, merged_rows = self._bytes.get(target, (0, 0))
        entries = sum(n * (self._bytes[k][0] + merged_entries) for k, n in counts.items() if k != target)
        pointers = max(merged_rows, *(self._bytes[k][1] for k in counts))
        return entries + (1 if target == BASE_KEY else 2) * pointers * sum(counts.values())

    def _candidates(self, counts: Counter) -> set[Hashable]:
        active = self.merged.key
        return {active, BASE_KEY, *counts} if active in self._deltas else {BASE_KEY, *counts}

    def release(self) -> None:
        """Forgets the correction plans and the deltas of sets other than the merged one (the adapter cache keeps
        them)."""
        wanted = {BASE_KEY, self.merged.key}
        for key in [k for k in self._deltas if k not in wanted]:
            self._deltas.pop(key, None)
            self._plans.pop(key, None)
            self._bytes.pop(key, None)
        self._negated.clear()
        self.corrector.forget_plans()
        metrics.CORRECTION_PLAN_BYTES.set(0)

    def choose_merged(self, rows: Sequence[Row]) -> Hashable:
        """The set to hold in the weights for these rows: the least per-step correction over the rows' horizon,
        counting the switch needed to get there, among the sets whose plan fits the budget."""
        active = self.merged.key
        counts = Counter(r.set_key for r in rows)
        if len(counts) == 1:
            return next(iter(counts))
        horizon = _horizon(rows)
        nnz = {k: self._deltas[k].nnz for k in counts}
        active_nnz = self._deltas[active].nnz if active in self._deltas else 0

        def cost(target: Hashable) -> float:
            merged_nnz = nnz.get(target, active_nnz if target == active else 0)
            written = 0 if target == active else active_nnz + merged_nnz
            corrected = [(nnz[k], n) for k, n in counts.items() if k != target]
            return horizon * self.corrector.step_cost(corrected, merged_nnz) + self.corrector.switch_cost(written)

        candidates = self._candidates(counts)
        within = {h for h in candidates if self._plan_bytes(counts, h) <= self.plan_bytes}
        if not within:  # admission keeps some merged set within budget; this only guards a budget lowered mid-batch
            within = {min(candidates, key=lambda h: self._plan_bytes(counts, h))}
        return min(within, key=lambda h: (cost(h), h != active))

    @contextlib.contextmanager
    def decode(self, rows: Sequence[Row]) -> Iterator[None]:
        """Picks the merged set (switching when it pays) and applies the rows' corrections in the step inside."""
        target = self.choose_merged(rows)
        if target != self.merged.key:
            self.merged.switch(target, self._plans.get(target))
            self.merged_switches += 1
        plan = self._plan(rows, target)
        nbytes = plan.nbytes if plan is not None else 0
        if nbytes > self.peak_plan_bytes:
            self.peak_plan_bytes = nbytes
        metrics.CORRECTION_PLAN_BYTES.set(nbytes)
        with self.corrector.active(plan):
            yield

    @contextlib.contextmanager
    def prefill(self, rows: Sequence[Row], running: Sequence[Row] = ()) -> Iterator[None]:
        """Prefills new rows under the merged set the next decode step will choose for them and the `running`
        rows, so their plan segment is built once, under that set, and the step reuses it. (Prefilling joiners
        under the old merged set gave their segment its delta; the step then switched and rebuilt every row's.)"""
        target = self.choose_merged([*running, *rows])
        if target != self.merged.key:
            self.merged.switch(target, self._plans.get(target))
            self.merged_switches += 1
        with self.corrector.active(self._plan(rows, target, running)):
            yield

    def _plan(self, rows: Sequence[Row], target: Hashable, running: Sequence[Row] | None = None):
        """The decode plan for `rows`, or with `running` given, the prefill plan for `rows` joining those."""
        terms = [self._terms(r.set_key, target) for r in rows]
        if not any(terms):
            return None
        builds, start = self.corrector.builds, time.perf_counter()
        if running is None:
            plan = self.corrector.decode_plan(terms, _horizon(rows))
        else:
            before = [self._terms(r.set_key, target) for r in running]
            plan = self.corrector.prefill_plan(terms, before, _horizon([*running, *rows]))
        if self.corrector.builds != builds:
            metrics.CORRECTION_PLAN_BUILD_SECONDS.observe(time.perf_counter() - start)
        return plan

    def _terms(self, key: Hashable, target: Hashable) -> tuple[PackedDelta, ...]:
        """The deltas that turn the merged set's output into this set's: d_key - d_merged."""
        if key == target:
            return ()
        own = () if key == BASE_KEY else (self._deltas[key],)
        if target == BASE_KEY:
            return own
        if target not in self._negated:  # shares the index arrays with its delta; only the values are new
            self._negated[target] = self._deltas[target].negated()
        return (*own, self._negated[target])


def _horizon(rows: Sequence[Row]) -> int:
    """Decode steps the rows have left, about: the median of their remaining token budgets."""
    return max(1, sorted(r.params.max_new_tokens - len(r.tokens) for r in rows)[len(rows) // 2])
