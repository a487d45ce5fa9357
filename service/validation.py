"""What a request or a name must satisfy, in one place: the HTTP layer and the engine both call these.

No FastAPI and no torch here, so the rules read on their own.
"""

from __future__ import annotations

import math
import re

from .errors import InvalidRequestError
from .types import COMBINATIONS, AdapterSet, SamplingParams

BASE_MODEL_ID = "base"  # reserved: names the base model in /v1 and cannot be an adapter name
MAX_VERSION = 2**31 - 1
MAX_DESCRIPTION_CHARS = 4096  # = shira_core.metadata.MAX_DESCRIPTION_CHARS (not imported: that imports torch)
DIGITS = re.compile(r"[0-9]+")  # ASCII only: str.isdigit() also takes "²", which int() refuses
# Always used with fullmatch: with match, "$" also matches before a trailing newline ("evil\n").
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _check_syntax(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        shown = name[:80] if isinstance(name, str) else name
        raise InvalidRequestError(
            f"adapter name {shown!r} is invalid: use 1-64 characters from a-z, 0-9, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def check_name(name: str) -> str:
    """Returns the name if it is a valid adapter name (not the base model's reserved one); raises
    InvalidRequestError naming the rule otherwise."""
    _check_syntax(name)
    if name == BASE_MODEL_ID:
        raise InvalidRequestError(f"adapter name {BASE_MODEL_ID!r} is reserved for the base model")
    return name


def split_version(spec: str) -> tuple[str, int | None]:
    """'boolq@3' -> ('boolq', 3); 'boolq' -> ('boolq', None). The name is not checked here (check_name)."""
    name, sep, version = spec.partition("@")
    if not sep:
        return name, None
    # The length check comes first: int() of a few thousand digits is slow, then refused with ValueError.
    if not DIGITS.fullmatch(version) or len(version) > 10 or not 1 <= int(version) <= MAX_VERSION:
        raise InvalidRequestError(
            f"version in {spec[:80]!r} must be an integer from 1 to {MAX_VERSION}, as in {name[:64]}@3"
        )
    return name, int(version)


def check_ref(spec: str) -> tuple[str, int | None]:
    """'boolq' or 'boolq@3' -> (name, version), both checked: every route reads adapter names through this."""
    name, version = split_version(spec)
    return check_name(name), version


MAX_WEIGHT = 100.0


class LimitExceededError(InvalidRequestError):
    """A field over one of the server's limits: a 422, like any field the schema refuses."""

    status, code = 422, "validation_error"


def check_set(adapters: AdapterSet, max_adapters: int) -> AdapterSet:
    """An adapter set's count, combination, duplicates and weights; returns the set."""
    if len(adapters.refs) > max_adapters:
        raise LimitExceededError(
            f"adapters: {len(adapters.refs)} adapters in one request, the limit is {max_adapters} "
            "(SHIRA_MAX_ADAPTERS_PER_REQUEST)"
        )
    if adapters.combination not in COMBINATIONS:
        raise InvalidRequestError(
            f"unknown merge {str(adapters.combination)[:40]!r}: the combination must be one of "
            f"{', '.join(COMBINATIONS)}"
        )
    seen: set[str] = set()
    for ref in adapters.refs:
        if ref.name in seen:
            raise InvalidRequestError(f"adapter {ref.name!r} appears twice in the set; give it one weight")
        seen.add(ref.name)
        weight = ref.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) \
                or abs(weight) > MAX_WEIGHT:
            raise InvalidRequestError(
                f"weight of adapter {ref.name!r} must be a finite number in [-{MAX_WEIGHT:g}, {MAX_WEIGHT:g}], "
                f"got {weight!r}"
            )
    return adapters


def check_sampling(params: SamplingParams, max_new_tokens: int, field: str = "max_new_tokens") -> SamplingParams:
    """Sampling settings within range and the token budget within the server's limit; returns them.

    Args:
        field: the name the client gave the token budget (max_tokens in the OpenAI API), for the message.
    """
    if not 1 <= params.max_new_tokens <= max_new_tokens:
        raise LimitExceededError(
            f"{field}: must be in 1..{max_new_tokens} (the limit is {max_new_tokens}, SHIRA_MAX_NEW_TOKENS), "
            f"got {params.max_new_tokens}"
        )
    if not (math.isfinite(params.temperature) and params.temperature >= 0):
        raise InvalidRequestError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise InvalidRequestError(f"top_p must be in (0, 1], got {params.top_p}")
    return params


def check_prompt(prompt_ids: list[int], max_prompt_tokens: int) -> list[int]:
    """A tokenised prompt's length; returns it."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty; send at least one token of text")
    if len(prompt_ids) > max_prompt_tokens:
        raise InvalidRequestError(
            f"the prompt is {len(prompt_ids)} tokens, the limit is {max_prompt_tokens} (SHIRA_MAX_PROMPT_TOKENS); "
            "shorten it"
        )
    return prompt_ids


def check_description(description: str | None) -> str | None:
    """The description of an upload, refused (422) over MAX_DESCRIPTION_CHARS characters."""
    if description is not None and len(description) > MAX_DESCRIPTION_CHARS:
        raise LimitExceededError(
            f"description: {len(description):,} characters, the limit is {MAX_DESCRIPTION_CHARS:,}"
        )
    return description
