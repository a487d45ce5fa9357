"""Adapter sets as clients write them, parsed into an AdapterSet (the rules are service.validation's).

Adapter sets are written the same way everywhere:
  ?adapter=boolq            one adapter (latest version), or boolq@3 for a pinned version
  ?adapters=boolq:0.6,piqa:0.4   a weighted set (combined by ?combination=linear|ties; merge= is its old name)
  model="boolq:0.6+piqa:0.4"     the OpenAI spelling; "[ties]" may follow, as in AdapterSet.label()

Names and versions go through validation.check_ref, the same check as uploads and /adapters/{name}.
Spaces around the items of a set are ignored; any other character outside a name is refused. A set given
but empty (?adapters=, ?adapters=",,", model="+") is a 422: no adapter means the base model only when no
set was given at all (or model is "base" or the model's label).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from fastapi.exceptions import RequestValidationError

from .. import validation
from ..config import Settings
from ..errors import InvalidRequestError
from ..protocol import AdapterWeight
from ..types import AdapterRef, AdapterSet
from ..validation import BASE_MODEL_ID, check_ref

_COMBINATION_SUFFIX = re.compile(r"(?P<set>.*)\[(?P<combination>[a-z]+)\]", re.DOTALL)
# ASCII only: float() also reads other scripts' digits ("٣") and underscores ("1_0").
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
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
    if not math.isfinite(weight) or abs(weight) > validation.MAX_WEIGHT:
        raise InvalidRequestError(f"weight of {head[:64]!r} must be a finite number in [-100, 100], got {weight}")
    name, version = check_ref(head)
    return AdapterRef(name=name, version=version, weight=weight)


def _empty_set(where: tuple[str, ...], given: str) -> RequestValidationError:
    return RequestValidationError([{
        "loc": where, "type": "too_short",
        "msg": f"{given[:80]!r} names no adapter; leave the field out (or use model 'base') for the base model",
    }])


def build_set(refs: Sequence[AdapterRef], combination: str | None, settings: Settings) -> AdapterSet:
    """The set, checked by service.validation.check_set (the engine's rules); an empty list is the base model."""
    return validation.check_set(AdapterSet(refs=tuple(refs), combination=combination or "linear"),
                                settings.max_adapters_per_request)


def native_set(
    adapter: str | None, adapters: str | None, body_adapters: list[AdapterWeight] | None, combination: str | None,
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
    return build_set(refs, combination, settings)


def model_set(model: str, model_label: str, settings: Settings) -> AdapterSet:
    """The adapter set named by an OpenAI `model` field: "base" or the model's label is the base model."""
    spec = model.strip(" ")
    if spec in (BASE_MODEL_ID, model_label):
        return AdapterSet()
    combination = None
    suffix = _COMBINATION_SUFFIX.fullmatch(spec)
    if suffix:
        spec, combination = suffix.group("set"), suffix.group("combination")
    refs = [parse_ref(part) for part in spec.split("+") if part.strip(" ")]
    if not refs:
        raise _empty_set(("body", "model"), model)
    return build_set(refs, combination, settings)


def metric_label(adapters: AdapterSet) -> str:
    """The request metric's adapter label: "base", the adapter's name, or "set" for two or more.

    Bounded on purpose: names are bounded by the registry, combinations of names are not (n names make
    2^n sets). Per-adapter rates come from shira_adapter_requests_total instead.
    """
    if adapters.is_base:
        return "base"
    return adapters.refs[0].name if len(adapters.refs) == 1 else SET_LABEL
