"""Types the HTTP layer and the engine share: adapter sets, requests and results, the resolved set, a queued
request, and the base model's key (no FastAPI, no torch here)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

BASE_KEY: tuple = ()  # the set key of the base model: no adapter merged into the weights
COMBINATIONS = ("linear", "ties")  # how a weighted set is combined: PEFT's combination_type


@dataclass(frozen=True)
class AdapterRef:
    """One adapter in a request: a name, an optional pinned version (name@3) and a weight."""

    name: str
    version: int | None = None
    weight: float = 1.0


@dataclass(frozen=True)
class AdapterSet:
    """The adapters a request runs with. Empty means the base model."""

    refs: tuple[AdapterRef, ...] = ()
    combination: str = "linear"

    @property
    def is_base(self) -> bool:
        return not self.refs

    def label(self) -> str:
        if self.is_base:
            return "base"
        parts = [f"{r.name}{'@' + str(r.version) if r.version else ''}:{r.weight:g}" for r in self.refs]
        plain = self.combination == "linear" or len(self.refs) == 1
        return "+".join(parts) + ("" if plain else f"[{self.combination}]")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # vLLM's name: decode to max_new_tokens, as load tests need


@dataclass
class GenerationRequest:
    """A tokenised prompt plus how to sample and which adapters to use."""

    prompt_ids: list[int]
    params: SamplingParams
    adapters: AdapterSet = field(default_factory=AdapterSet)
    resolved: Any = None  # Engine.resolve_set(adapters) when the caller has it: saves a second registry read


@dataclass
class Timings:
    queue_ms: float = 0.0
    switch_ms: float = 0.0
    generate_ms: float = 0.0


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    adapters: list[dict]  # [{"name", "version", "weight"}], resolved versions; [] for the base model
    timings: Timings


@dataclass(frozen=True)
class ResolvedSet:
    """An adapter set with every adapter pinned to a stored record (name, version, sha256).

    `key` identifies the weights the set produces: equal keys can share a batch and a scatter plan.
    """

    key: tuple
    items: tuple[tuple[Any, float], ...]  # (AdapterRecord, weight), in request order
    combination: str
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
        return ResolvedSet(BASE_KEY, (), "linear", AdapterSet((), adapters.combination), "base")
    items = tuple((rec, float(ref.weight)) for ref, rec in zip(adapters.refs, records, strict=True))
    combination = adapters.combination if len(items) > 1 else "linear"  # one adapter: every combination is one
    key = (tuple(sorted((rec.name, rec.version, rec.sha256, w) for rec, w in items)), combination)
    pinned = AdapterSet(
        tuple(AdapterRef(rec.name, rec.version, ref.weight) for ref, rec in zip(adapters.refs, records, strict=True)),
        adapters.combination,
    )
    return ResolvedSet(key, items, combination, pinned, pinned.label())


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


class EngineAPI(Protocol):
    """What the HTTP layer uses of the engine (service.engine.Engine; tests pass a double). A protocol, so the
    routes are typed without importing torch."""

    model_label: str
    fingerprint: Any

    def ready(self) -> bool: ...

    def status(self) -> dict: ...

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]: ...

    def validate_upload(self, data: bytes, name: str) -> Any: ...

    async def resolve_set(self, adapters: AdapterSet) -> ResolvedSet: ...

    async def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]: ...
