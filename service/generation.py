"""Request and result types shared by the HTTP layer and the engine (no FastAPI, no torch here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidRequestError

# Always used with fullmatch: with match, "$" also matches before a trailing newline ("evil\n").
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MERGES = ("linear", "ties")


def check_name(name: str) -> str:
    """Returns the name if it is a valid adapter name; raises InvalidRequestError naming the rule otherwise."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = name[:80] if isinstance(name, str) else name
        raise InvalidRequestError(
            f"adapter name {shown!r} is invalid: use 1-64 characters from a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


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
    merge: str = "linear"

    @property
    def is_base(self) -> bool:
        return not self.refs

    def label(self) -> str:
        if self.is_base:
            return "base"
        parts = [f"{r.name}{'@' + str(r.version) if r.version else ''}:{r.weight:g}" for r in self.refs]
        return "+".join(parts) + ("" if self.merge == "linear" or len(self.refs) == 1 else f"[{self.merge}]")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


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
