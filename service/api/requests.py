"""Turning HTTP inputs into a GenerationRequest: adapter-set specs, sampling limits, prompt encoding.

Adapter sets are written the same way everywhere:
  ?adapter=boolq            one adapter (latest version), or boolq@3 for a pinned version
  ?adapters=boolq:0.6,piqa:0.4   a weighted set (fused with ?merge=linear|ties)
  model="boolq:0.6+piqa:0.4"     the OpenAI spelling; "[ties]" may follow, as in AdapterSet.label()
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError

from ..adapter_service import BASE_MODEL_ID, check_name, split_version
from ..config import Settings
from ..errors import InvalidRequestError
from ..generation import MERGES, AdapterRef, AdapterSet, GenerationRequest, SamplingParams
from ..protocol import AdapterWeight, ChatMessage

_MERGE_SUFFIX = re.compile(r"^(?P<set>.*)\[(?P<merge>[a-z]+)\]$")
MAX_WEIGHT = 100.0


def parse_ref(spec: str, weight: float | None = None) -> AdapterRef:
    """'boolq', 'boolq@3', 'boolq:0.6' or 'boolq@3:0.6' -> AdapterRef; `weight` overrides a missing one."""
    spec = spec.strip()
    head, sep, weight_text = spec.partition(":")
    if sep:
        try:
            weight = float(weight_text)
        except ValueError:
            raise InvalidRequestError(f"weight in {spec[:80]!r} is not a number (write name:0.6)") from None
    weight = 1.0 if weight is None else float(weight)
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise InvalidRequestError(f"weight of {head[:64]!r} must be a finite number in [-100, 100], got {weight}")
    name, version = split_version(head)
    check_name(name)
    return AdapterRef(name=name, version=version, weight=weight)


def parse_merge(merge: str | None) -> str:
    merge = merge or "linear"
    if merge not in MERGES:
        raise InvalidRequestError(f"merge must be one of {', '.join(MERGES)}, not {merge[:40]!r}")
    return merge


def build_set(refs: Sequence[AdapterRef], merge: str | None, settings: Settings) -> AdapterSet:
    """Checks the count and duplicates; an empty list is the base model."""
    if len(refs) > settings.max_adapters_per_request:
        raise RequestValidationError([{
            "loc": ("adapters",), "type": "too_long",
            "msg": f"{len(refs)} adapters in one request, the limit is {settings.max_adapters_per_request} "
                   "(SHIRA_MAX_ADAPTERS_PER_REQUEST)",
        }])
    seen: set[tuple[str, int | None]] = set()
    for ref in refs:
        if (ref.name, ref.version) in seen:
            raise InvalidRequestError(f"adapter {ref.name!r} appears twice in the set; give it one weight")
        seen.add((ref.name, ref.version))
    return AdapterSet(refs=tuple(refs), merge=parse_merge(merge))


def native_set(
    adapter: str | None, adapters: str | None, body_adapters: list[AdapterWeight] | None, merge: str | None,
    settings: Settings,
) -> AdapterSet:
    """The adapter set of POST /generate, from ?adapter=, ?adapters= or the JSON body (only one of them)."""
    given = [k for k, v in (("adapter", adapter), ("adapters", adapters), ("body adapters", body_adapters)) if v]
    if len(given) > 1:
        raise InvalidRequestError(f"give the adapter set once, not in both {given[0]} and {given[1]}")
    if adapter:
        if "," in adapter:
            raise InvalidRequestError("?adapter= takes one name; use ?adapters=a:0.5,b:0.5 for a weighted set")
        refs = [parse_ref(adapter)]
    elif adapters:
        refs = [parse_ref(part) for part in adapters.split(",") if part.strip()]
    else:
        refs = [parse_ref(a.name, a.weight) for a in body_adapters or []]
    return build_set(refs, merge, settings)


def model_set(model: str, model_label: str, settings: Settings) -> AdapterSet:
    """The adapter set named by an OpenAI `model` field."""
    model = model.strip()
    if model in (BASE_MODEL_ID, model_label, ""):
        return AdapterSet()
    merge = None
    suffix = _MERGE_SUFFIX.match(model)
    if suffix:
        model, merge = suffix.group("set"), suffix.group("merge")
    refs = [parse_ref(part) for part in model.split("+") if part.strip()]
    return build_set(refs, merge, settings)


def sampling(
    settings: Settings, max_new_tokens: int | None, temperature: float, top_p: float, seed: int | None,
    stop: str | list[str] | None, field: str = "max_new_tokens",
) -> SamplingParams:
    """SamplingParams within the server's limits; over the max_new_tokens limit is a 422 like any bad field."""
    if max_new_tokens is None:  # a default above the limit is the operator's slip, not the client's
        max_new_tokens = min(settings.default_max_new_tokens, settings.max_new_tokens)
    wanted = max_new_tokens
    if wanted > settings.max_new_tokens:
        raise RequestValidationError([{
            "loc": ("body", field), "type": "less_than_equal",
            "msg": f"{field} is {wanted}, the limit is {settings.max_new_tokens} (SHIRA_MAX_NEW_TOKENS)",
        }])
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return SamplingParams(max_new_tokens=wanted, temperature=temperature, top_p=top_p, seed=seed, stop=stops)


def encode(engine: Any, prompt: str | None = None, messages: list[ChatMessage] | None = None) -> list[int]:
    """Prompt ids from the engine's tokenizer; chat messages go through its chat template."""
    if messages is None:
        return engine.encode(prompt=prompt)
    try:
        plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    except ValueError as e:
        raise InvalidRequestError(str(e)) from e
    return engine.encode(messages=plain)


def metric_label(adapters: AdapterSet) -> str:
    """Adapter names only: weights and versions would give the request metric unbounded label values."""
    return "+".join(sorted(r.name for r in adapters.refs)) or "base"


async def prepare(engine: Any, prompt_ids: list[int], params: SamplingParams, adapters: AdapterSet,
                  state: Any) -> GenerationRequest:
    """Resolves the set (unknown adapter -> 404, never the base model instead) and labels the request metric."""
    resolved = await engine.resolve_set(adapters)
    state.adapter_label = metric_label(resolved.pinned)
    return GenerationRequest(prompt_ids=prompt_ids, params=params, adapters=resolved.pinned, resolved=resolved)
