"""Which requests run next: groups of requests that share an adapter set, served one batch at a time.

Pure Python (no torch), so the policy is unit-testable on its own. The engine's worker asks for the next
batch; the scheduler answers with one group key and up to `max_batch_size` tickets of that group.

Policy, in order:
1. No request waits behind more than `max_groups_waited` batches of other work. Every ticket counts the
   batches served since it arrived; a choice that would make that bound impossible to keep is refused in
   favour of the group with the least slack (earliest deadline first).
2. Otherwise the set that is already applied keeps going while it has work (no switch at all).
3. Otherwise the largest group, the one with the oldest request on ties.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from .errors import QueueFullError


@dataclass(eq=False)
class Ticket:
    """One queued request. `waited` counts the batches served while it was queued."""

    key: Hashable
    item: Any
    seq: int
    arrived: float = field(default_factory=time.monotonic)
    waited: int = 0
    queued: bool = True


class Scheduler:
    """A thread-safe queue of requests grouped by adapter-set key.

    Args:
        max_batch_size: the most tickets one batch takes.
        max_groups_waited: the bound on batches a ticket waits behind (kept whenever the load allows it).
        max_queue: the most tickets waiting at once; submit raises QueueFullError beyond it.
    """

    def __init__(self, max_batch_size: int, max_groups_waited: int, max_queue: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.max_groups_waited = max(0, max_groups_waited)
        self.max_queue = max_queue
        self._groups: OrderedDict[Hashable, list[Ticket]] = OrderedDict()
        self._seq = itertools.count()
        self._depth = 0
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # notified on every submit and cancel

    @property
    def depth(self) -> int:
        return self._depth

    def depth_of(self, key: Hashable) -> int:
        with self._lock:
            return len(self._groups.get(key, ()))

    def submit(self, key: Hashable, item: Any) -> Ticket:
        """Queues `item` under `key`. Raises QueueFullError when max_queue tickets already wait."""
        with self._lock:
            if self._depth >= self.max_queue:
                raise QueueFullError(
                    f"the queue is full ({self._depth} waiting, limit {self.max_queue}); retry shortly"
                )
            ticket = Ticket(key, item, next(self._seq))
            self._groups.setdefault(key, []).append(ticket)
            self._depth += 1
            self.changed.notify_all()
            return ticket

    def cancel(self, ticket: Ticket) -> bool:
        """Removes a ticket that has not been picked yet. Returns False when it already left the queue."""
        with self._lock:
            if not ticket.queued:
                return False
            group = self._groups[ticket.key]
            group.remove(ticket)
            if not group:
                del self._groups[ticket.key]
            ticket.queued = False
            self._depth -= 1
            self.changed.notify_all()
            return True

    def wait(self, timeout: float) -> bool:
        """Blocks until something is queued or `timeout` seconds pass. Returns whether work is queued."""
        with self._lock:
            if self._depth == 0:
                self.changed.wait(timeout)
            return self._depth > 0

    def next_batch(self, active: Hashable | None = None) -> tuple[Hashable, list[Ticket]] | None:
        """Picks the next group and takes up to max_batch_size of its oldest tickets.

        Args:
            active: the key of the set applied right now, served first while it has work.

        Returns:
            (key, tickets), or None when nothing is queued.
        """
        with self._lock:
            if not self._groups:
                return None
            key = self._choose(active)
            batch = self._take(key, self.max_batch_size)
            for group in self._groups.values():
                for ticket in group:
                    ticket.waited += 1
            return key, batch

    def take(self, key: Hashable, limit: int) -> list[Ticket]:
        """Takes up to `limit` more tickets of `key` for the batch being formed (no batch is counted)."""
        with self._lock:
            return self._take(key, limit) if key in self._groups and limit > 0 else []

    def heads(self) -> list[tuple[Hashable, Any]]:
        """(key, oldest item) of every queued group, for deciding which groups may share a mixed batch."""
        with self._lock:
            return [(k, group[0].item) for k, group in self._groups.items()]

    def take_oldest(self, keys: set[Hashable], limit: int,
                    admits: Callable[[Hashable], bool] | None = None) -> list[Ticket]:
        """Takes up to `limit` of the oldest tickets over the groups in `keys` (mixed-set batches).

        `admits(key)` is asked for each ticket in age order; the first refusal ends the take, so a ticket that does
        not fit is never overtaken by younger ones (it goes first once there is room).
        """
        with self._lock:
            candidates = sorted((t for k in keys if k in self._groups for t in self._groups[k]), key=lambda t: t.seq)
            batch = []
            for ticket in candidates[: max(0, limit)]:
                if admits is not None and not admits(ticket.key):
                    break
                batch.append(ticket)
            for ticket in batch:
                group = self._groups[ticket.key]
                group.remove(ticket)
                if not group:
                    del self._groups[ticket.key]
                ticket.queued = False
            self._depth -= len(batch)
            return batch

    def _take(self, key: Hashable, limit: int) -> list[Ticket]:
        group = self._groups[key]
        batch, rest = group[:limit], group[limit:]
        if rest:
            self._groups[key] = rest
        else:
            del self._groups[key]
        for ticket in batch:
            ticket.queued = False
        self._depth -= len(batch)
        return batch

    def _choose(self, active: Hashable | None) -> Hashable:
        preferred: list[Hashable] = []
        if active in self._groups:
            preferred.append(active)
        preferred += sorted(self._groups, key=lambda k: (-min(len(self._groups[k]), self.max_batch_size),
                                                          self._groups[k][0].seq))
        for key in preferred:
            if self._feasible_after(key):
                return key
        # Overloaded: the bound cannot hold for everyone; serve the most overdue group first.
        return min(self._groups, key=lambda k: (self._slack(self._groups[k][0]), self._groups[k][0].seq))

    def _slack(self, ticket: Ticket) -> int:
        return self.max_groups_waited - ticket.waited

    def _feasible_after(self, key: Hashable) -> bool:
        # After serving `key`, every remaining group still needs one batch; sorted by slack, the j-th (from 0)
        # must be able to wait j more batches: slack - 1 >= j.
        slacks = []
        for k, group in self._groups.items():
            rest = group[self.max_batch_size:] if k == key else group
            if rest:
                slacks.append(self._slack(rest[0]) - 1)
        slacks.sort()
        return all(s >= j for j, s in enumerate(slacks))

    def snapshot(self) -> dict[str, int]:
        """Queue depth per group key (as text), for status pages."""
        with self._lock:
            return {str(k): len(v) for k, v in self._groups.items()}
