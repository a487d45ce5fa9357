"""Mixed-set batches: rows of several adapter sets decode together, one set (the host) in the weights.

The worker's side of shira_core.guest_rows: it decides which sets may ride as guests, picks the host before
each decode step (switching the weights when that pays), and hands the generator the guest plan for each
forward pass. Rows of the host set cost nothing extra; every other row adds its set's delta, and the host's
delta negated when the host is not the base: on the CPU in the native kernel, which reads each delta once for
all its rows, else in one block-diagonal sparse product per layer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

from shira_core.guest_rows import GuestRows, SetDelta
from shira_core.switcher import SwitchPlan

from . import metrics
from .batch_generation import Row
from .merged_set import MergedSet
from .types import BASE_KEY

log = logging.getLogger(__name__)

# A guest costs about GUEST_ENTRY_COST dense weights' worth of forward-pass time per delta entry (measured
# while serving on a 2-core CPU, SmolLM2-135M fp32, 8 rows: ~1.8 ns per sparse entry per decode step, ~0.08 ns
# per dense weight and row; on a day the VM ran 2x slower, 4 and 0.26 ns). A set whose delta would cost more
# than one dense forward pass per step runs in a batch of its own.
GUEST_ENTRY_COST = 20


class MixedBatches:
    """Host choice and guest plans for one worker.

    The worker hands it each set it may mix as data (`add`: the set's scatter plan and its delta); it switches
    the weights through the MergedSet it shares with the worker, and calls nothing above it.

    Args:
        guests: the GuestRows bound to the model and the Switcher.
        merged: the set in the weights, and the switches that change it.
        dense_params: the model's adaptable Linear weights, for the guest-size limit.
        plan_bytes: the most bytes a decode plan may hold. The plan copies every corrected row's deltas, so it
            grows with the batch (16 rows of a 1%-dense adapter on a 1.7B model: ~2 GB); rows that would push it
            past this wait for room (`fits`).
    """

    def __init__(self, guests: GuestRows, merged: MergedSet, dense_params: int,
                 plan_bytes: int = 256 * 2**20) -> None:
        self.guests = guests
        self.merged = merged
        self.max_guest_nnz = dense_params // GUEST_ENTRY_COST
        self.plan_bytes = plan_bytes
        self.peak_plan_bytes = 0
        self._bytes: dict[Hashable, tuple[int, int]] = {BASE_KEY: (0, 0)}  # a set's (entry, row pointer) bytes
        self._plans: dict[Hashable, SwitchPlan | None] = {BASE_KEY: None}
        self._deltas: dict[Hashable, SetDelta] = {BASE_KEY: SetDelta("base", {}, 0)}  # relative to the base
        self._negated: dict[Hashable, SetDelta] = {}  # host key -> -d_host
        self._refused: set[Hashable] = set()
        self.host_switches = 0

    def known(self, key: Hashable) -> bool | None:
        """Whether rows of this set may share a batch with other sets; None until the set is added or refused."""
        if key in self._deltas:
            return True
        return False if key in self._refused else None

    def add(self, key: Hashable, plan: SwitchPlan, delta: SetDelta) -> bool:
        """Takes a set's scatter plan and delta; False (and refused from then on) when its delta is too large to
        ride as a guest, so it runs in batches of its own."""
        if delta.nnz > self.max_guest_nnz:
            self.refuse(key, f"{delta.nnz:,} entries, over the guest limit of {self.max_guest_nnz:,}")
            return False
        self._plans[key], self._deltas[key] = plan, delta
        self._bytes[key] = (delta.entry_bytes, delta.pointer_bytes)
        return True

    def refuse(self, key: Hashable, reason: Any) -> None:
        log.info("set %s runs in batches of its own: %s", key, reason)
        self._refused.add(key)

    def fits(self, keys: Sequence[Hashable]) -> bool:
        """Whether rows of these (mixable) sets can decode together within the plan budget under some host."""
        counts = Counter(keys)
        if len(counts) <= 1:
            return True
        return min(self._plan_bytes(counts, h) for h in self._hosts(counts)) <= self.plan_bytes

    def _plan_bytes(self, counts: Counter, host: Hashable) -> int:
        """An upper bound on the decode plan's bytes for rows of these sets under this host: each guest row's
        entries (its own delta's, and the host's negated), and row pointers for every row at the plan's depth.
        Deltas for the native kernel report none of these bytes: its plans point into them and copy nothing."""
        host_entries, host_rows = self._bytes.get(host, (0, 0))
        entries = sum(n * (self._bytes[k][0] + host_entries) for k, n in counts.items() if k != host)
        pointers = max(host_rows, *(self._bytes[k][1] for k in counts))
        return entries + (1 if host == BASE_KEY else 2) * pointers * sum(counts.values())

    def _hosts(self, counts: Counter) -> set[Hashable]:
        active = self.merged.key
        return {active, BASE_KEY, *counts} if active in self._deltas else {BASE_KEY, *counts}

    def release(self) -> None:
        """Forgets the decode plan and the deltas of sets other than the host's (the adapter cache keeps them)."""
        wanted = {BASE_KEY, self.merged.key}
        for key in [k for k in self._deltas if k not in wanted]:
            self._deltas.pop(key, None)
            self._plans.pop(key, None)
            self._bytes.pop(key, None)
        self._negated.clear()
        self.guests.forget_plans()
        metrics.GUEST_PLAN_BYTES.set(0)

    def choose_host(self, rows: Sequence[Row]) -> Hashable:
        """The set to hold in the weights for these rows: the least per-step correction over the rows' horizon,
        counting the switch needed to get there, among the hosts whose plan fits the budget."""
        active = self.merged.key
        counts = Counter(r.set_key for r in rows)
        if len(counts) == 1:
            return next(iter(counts))
        horizon = _horizon(rows)
        nnz = {k: self._deltas[k].nnz for k in counts}
        active_nnz = self._deltas[active].nnz if active in self._deltas else 0

        def cost(host: Hashable) -> float:
            host_nnz = nnz.get(host, active_nnz if host == active else 0)
            written = 0 if host == active else active_nnz + host_nnz
            guests = [(nnz[k], n) for k, n in counts.items() if k != host]
            return horizon * self.guests.step_cost(guests, host_nnz) + self.guests.switch_cost(written)

        candidates = self._hosts(counts)
        within = {h for h in candidates if self._plan_bytes(counts, h) <= self.plan_bytes}
        if not within:  # admission keeps some host within budget; this only guards a budget lowered mid-batch
            within = {min(candidates, key=lambda h: self._plan_bytes(counts, h))}
        return min(within, key=lambda h: (cost(h), h != active))

    @contextlib.contextmanager
    def decode(self, rows: Sequence[Row]) -> Iterator[None]:
        """Picks the host (switching when it pays) and applies the guests' corrections in the step inside."""
        host = self.choose_host(rows)
        if host != self.merged.key:
            self.merged.switch(host, self._plans.get(host))
            self.host_switches += 1
        plan = self._plan(rows, host)
        nbytes = plan.nbytes if plan is not None else 0
        if nbytes > self.peak_plan_bytes:
            self.peak_plan_bytes = nbytes
        metrics.GUEST_PLAN_BYTES.set(nbytes)
        with self.guests.active(plan):
            yield

    @contextlib.contextmanager
    def prefill(self, rows: Sequence[Row], running: Sequence[Row] = ()) -> Iterator[None]:
        """Prefills new rows under the host the next decode step will choose for them and the `running` rows, so
        their plan segment is built once, under that host, and the step reuses it. (Prefilling joiners under the
        old host gave their segment the old host's delta; the step then switched and rebuilt every row's.)"""
        host = self.choose_host([*running, *rows])
        if host != self.merged.key:
            self.merged.switch(host, self._plans.get(host))
            self.host_switches += 1
        with self.guests.active(self._plan(rows, host, running)):
            yield

    def _plan(self, rows: Sequence[Row], host: Hashable, running: Sequence[Row] | None = None):
        """The decode plan for `rows`, or with `running` given, the prefill plan for `rows` joining those."""
        terms = [self._terms(r.set_key, host) for r in rows]
        if not any(terms):
            return None
        builds, start = self.guests.builds, time.perf_counter()
        if running is None:
            plan = self.guests.decode_plan(terms, _horizon(rows))
        else:
            before = [self._terms(r.set_key, host) for r in running]
            plan = self.guests.prefill_plan(terms, before, _horizon([*running, *rows]))
        if self.guests.builds != builds:
            metrics.GUEST_PLAN_BUILD_SECONDS.observe(time.perf_counter() - start)
        return plan

    def _terms(self, key: Hashable, host: Hashable) -> tuple[SetDelta, ...]:
        """The deltas that turn the host's output into this set's: d_key - d_host."""
        if key == host:
            return ()
        own = () if key == BASE_KEY else (self._deltas[key],)
        if host == BASE_KEY:
            return own
        if host not in self._negated:  # shares the index arrays with the host's delta; only the values are new
            self._negated[host] = self._deltas[host].negated()
        return (*own, self._negated[host])


def _horizon(rows: Sequence[Row]) -> int:
    """Decode steps the rows have left, about: the median of their remaining token budgets."""
    return max(1, sorted(r.params.max_new_tokens - len(r.tokens) for r in rows)[len(rows) // 2])
