"""Types the engine's layers share: the resolved adapter set, a queued request, and the base model's key."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from .generation import AdapterRef, AdapterSet, GenerationRequest

BASE_KEY: tuple = ()  # the set key of the base model: no adapter merged into the weights


@dataclass(frozen=True)
class ResolvedSet:
    """An adapter set with every adapter pinned to a stored record (name, version, sha256).

    `key` identifies the weights the set produces: equal keys can share a batch and a scatter plan.
    """

    key: tuple
    items: tuple[tuple[Any, float], ...]  # (AdapterRecord, weight), in request order
    merge: str
    pinned: AdapterSet
    label: str

    @property
    def names(self) -> list[str]:
        return [rec.name for rec, _ in self.items]

    def used(self) -> list[dict]:
        return [{"name": rec.name, "version": rec.version, "weight": w} for rec, w in self.items]


def resolved_set(adapters: AdapterSet, records: list[Any]) -> ResolvedSet:
    """Builds the ResolvedSet of `adapters` from their registry records (same order)."""
    if not records:
        return ResolvedSet(BASE_KEY, (), "linear", AdapterSet((), adapters.merge), "base")
    items = tuple((rec, float(ref.weight)) for ref, rec in zip(adapters.refs, records, strict=True))
    merge = adapters.merge if len(items) > 1 else "linear"  # one adapter: every merge is the same
    key = (tuple(sorted((rec.name, rec.version, rec.sha256, w) for rec, w in items)), merge)
    pinned = AdapterSet(
        tuple(AdapterRef(rec.name, rec.version, ref.weight) for ref, rec in zip(adapters.refs, records, strict=True)),
        adapters.merge,
    )
    return ResolvedSet(key, items, merge, pinned, pinned.label())


@dataclass(eq=False)
class Pending:
    """One request between the event loop and the worker."""

    request: GenerationRequest
    rset: ResolvedSet
    loop: asyncio.AbstractEventLoop
    stream: bool
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    enqueued: float = field(default_factory=time.monotonic)
    ticket: Any = None
    cancelled: bool = False
    finished: bool = False

    def put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def fail(self, error: BaseException) -> None:
        self.finished = True
        self.put(error)
