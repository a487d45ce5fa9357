"""Turning HTTP inputs into a GenerationRequest: adapter-set specs, sampling limits, prompt encoding.

Adapter sets are written the same way everywhere:
  ?adapter=boolq            one adapter (latest version), or boolq@3 for a pinned version
  ?adapters=boolq:0.6,piqa:0.4   a weighted set (fused with ?merge=linear|ties)
  model="boolq:0.6+piqa:0.4"     the OpenAI spelling; "[ties]" may follow, as in AdapterSet.label()

Names and versions go through adapter_service.check_ref, the same check as uploads and /adapters/{name}.
Spaces around the items of a set are ignored; any other character outside a name is refused. A set given
but empty (?adapters=, ?adapters=",,", model="+") is a 422: no adapter means the base model only when no
set was given at all (or model is "base" or the model's label).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError

from ..adapter_service import BASE_MODEL_ID, check_ref
from ..config import Settings
from ..errors import InvalidRequestError
from ..generation import MERGES, AdapterRef, AdapterSet, GenerationRequest, SamplingParams
from ..metrics import ADAPTER_REQUESTS
from ..protocol import AdapterWeight, ChatMessage

_MERGE_SUFFIX = re.compile(r"(?P<set>.*)\[(?P<merge>[a-z]+)\]", re.DOTALL)
# ASCII only: float() also reads other scripts' digits ("٣") and underscores ("1_0").
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
MAX_WEIGHT = 100.0
SET_LABEL = "set"  # the request metric's label for a weighted set of two or more adapters


def parse_ref(spec: str) -> AdapterRef:
    """'boolq', 'boolq@3', 'boolq:0.6' or 'boolq@3:0.6' -> AdapterRef (weight 1 when none is given)."""
    spec = spec.strip(" ")
    head, sep, weight_text = spec.partition(":")
    weight = 1.0
    if sep:
        if not _NUMBER.fullmatch(weight_text):
            raise InvalidRequestError(f"weight in {spec[:80]!r} is not a number (write name:0.6)")
        weight = float(weight_text)
    if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
        raise InvalidRequestError(f"weight of {head[:64]!r} must be a finite number in [-100, 100], got {weight}")
    name, version = check_ref(head)
    return AdapterRef(name=name, version=version, weight=weight)


def _empty_set(where: tuple[str, ...], given: str) -> RequestValidationError:
    return RequestValidationError([{
        "loc": where, "type": "too_short",
        "msg": f"{given[:80]!r} names no adapter; leave the field out (or use model 'base') for the base model",
    }])


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
    given = [k for k, v in (("adapter", adapter), ("adapters", adapters)) if v is not None]
    given += ["body adapters"] if body_adapters else []  # [] in the body is the base model, as when left out
    if len(given) > 1:
        raise InvalidRequestError(f"give the adapter set once, not in both {given[0]} and {given[1]}")
    if adapter is not None:
        if "," in adapter:
            raise InvalidRequestError("?adapter= takes one name; use ?adapters=a:0.5,b:0.5 for a weighted set")
        if not adapter.strip(" "):
            raise _empty_set(("query", "adapter"), adapter)
        refs = [parse_ref(adapter)]
    elif adapters is not None:
        refs = [parse_ref(part) for part in adapters.split(",") if part.strip(" ")]
        if not refs:
            raise _empty_set(("query", "adapters"), adapters)
    else:
        # A JSON name is exact: no spaces stripped and no ":weight" read from it (weight is its own field).
        refs = [AdapterRef(*check_ref(a.name), weight=a.weight) for a in body_adapters or []]
    return build_set(refs, merge, settings)


def model_set(model: str, model_label: str, settings: Settings) -> AdapterSet:
    """The adapter set named by an OpenAI `model` field: "base" or the model's label is the base model."""
    spec = model.strip(" ")
    if spec in (BASE_MODEL_ID, model_label):
        return AdapterSet()
    merge = None
    suffix = _MERGE_SUFFIX.fullmatch(spec)
    if suffix:
        spec, merge = suffix.group("set"), suffix.group("merge")
    refs = [parse_ref(part) for part in spec.split("+") if part.strip(" ")]
    if not refs:
        raise _empty_set(("body", "model"), model)
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
    """The request metric's adapter label: "base", the adapter's name, or "set" for two or more.

    Bounded on purpose: names are bounded by the registry, combinations of names are not (n names make
    2^n sets). Per-adapter rates come from shira_adapter_requests_total instead.
    """
    if adapters.is_base:
        return "base"
    return adapters.refs[0].name if len(adapters.refs) == 1 else SET_LABEL


async def prepare(engine: Any, prompt_ids: list[int], params: SamplingParams, adapters: AdapterSet,
                  state: Any) -> GenerationRequest:
    """Resolves the set (unknown adapter -> 404, never the base model instead) and labels the request metrics."""
    resolved = await engine.resolve_set(adapters)
    state.adapter_label = metric_label(resolved.pinned)
    for name in {r.name for r in resolved.pinned.refs}:
        ADAPTER_REQUESTS.labels(adapter=name).inc()
    return GenerationRequest(prompt_ids=prompt_ids, params=params, adapters=resolved.pinned, resolved=resolved)
