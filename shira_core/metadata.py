"""Limits and type checks for the JSON an uploaded adapter carries, shared by the native and PEFT formats.

JSON is measured (size, nesting depth) before it is parsed, so hostile input cannot exhaust the stack or
memory. Then every field is type-checked here, in one place: the ``shira`` metadata both formats keep in
their safetensors header, and PEFT's adapter_config.json. Each wrong field raises AdapterFormatError naming
the field and what was expected. Unknown top-level keys are ignored (a newer writer may add some).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, NoReturn

import numpy as np

from .errors import AdapterFormatError

MAX_HEADER_BYTES = 16 * 1024 * 1024  # a safetensors header or a JSON config; real ones are well under 1 MiB
MAX_JSON_DEPTH = 64  # real headers nest 3 deep; json.loads recurses once per level
MAX_DESCRIPTION_CHARS = 4096
MAX_MASK_CHARS = 64
MAX_NUMEL = 2**63 - 1  # flat indices are int64
FINGERPRINT_KEYS = ("id", "structure", "dtype", "probes")

_OPEN, _CLOSE, _QUOTE, _BACKSLASH = (ord("["), ord("{")), (ord("]"), ord("}")), ord('"'), ord("\\")


def json_depth(text: bytes) -> int:
    """The deepest bracket nesting of UTF-8 JSON text, brackets inside strings not counted. No recursion.

    Linear numpy passes over the bytes, then work per quote and bracket only: fast on a multi-MB header.
    """
    raw = np.frombuffer(text, dtype=np.uint8)
    quotes = np.flatnonzero(raw == _QUOTE)
    slashes = np.flatnonzero(raw == _BACKSLASH)
    if quotes.size and slashes.size:
        # A quote is escaped when the run of backslashes just before it is odd.
        new_run = np.ones(slashes.size, dtype=bool)
        new_run[1:] = np.diff(slashes) != 1
        run_start = np.maximum.accumulate(np.where(new_run, np.arange(slashes.size), 0))
        j = np.minimum(np.searchsorted(slashes, quotes - 1), slashes.size - 1)
        run = np.where(slashes[j] == quotes - 1, j - run_start[j] + 1, 0)
        quotes = quotes[run % 2 == 0]
    opens = (raw == _OPEN[0]) | (raw == _OPEN[1])
    brackets = np.flatnonzero(opens | (raw == _CLOSE[0]) | (raw == _CLOSE[1]))
    brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]  # an even count of quotes before: outside
    steps = np.where(opens[brackets], 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def parse_json(data: bytes | str, what: str, limit: int = MAX_HEADER_BYTES) -> Any:
    """json.loads after refusing text over `limit` bytes or nested deeper than MAX_JSON_DEPTH.

    Args:
        data: UTF-8 bytes, or text.
        what: names the text in errors, e.g. "safetensors header".
        limit: the largest size accepted, in bytes.

    Returns:
        The parsed value.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > limit:
        raise AdapterFormatError(f"{what} is {len(raw):,} bytes, over the limit of {limit:,}")
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise AdapterFormatError(f"{what} nests {depth:,} levels deep, over the limit of {MAX_JSON_DEPTH}")
    try:
        return json.loads(raw.decode("utf-8-sig") if isinstance(data, bytes) else data)
    except RecursionError as e:  # a belt: the depth check should have refused it
        raise AdapterFormatError(f"{what} nests too deep to parse") from e
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, ints over Python's digit limit
        raise AdapterFormatError(f"{what} is not JSON ({e})") from e


def _kind(value: Any) -> str:
    """The JSON word for a value's type, with a short excerpt: errors quote what they got, not all of it."""
    words = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    word = words.get(type(value), "a number")
    return word if isinstance(value, dict | list | type(None)) else f"{word} {repr(value)[:40]}"


def _short(name: str) -> str:
    return name if len(name) <= 100 else name[:100] + "..."


def _fail(where: str, name: str, expected: str, got: Any) -> NoReturn:
    raise AdapterFormatError(f"{where}: {_short(name)!r} must be {expected}, got {_kind(got)}")


def _string(value: Any, where: str, name: str, limit: int | None = None) -> str:
    if not isinstance(value, str):
        _fail(where, name, "a string", value)
    if limit is not None and len(value) > limit:
        raise AdapterFormatError(f"{where}: {name!r} is {len(value):,} characters, over the limit of {limit:,}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate from a \ud800 escape: no UTF-8 writer takes it
        raise AdapterFormatError(f"{where}: {_short(name)!r} is not valid Unicode text ({e.reason})") from e
    return value


def _text(info: dict[str, Any], key: str, where: str, limit: int | None = None) -> str | None:
    value = info.get(key)
    return None if value is None else _string(value, where, key, limit)


def check_description(value: Any, where: str = "adapter") -> str | None:
    """Refuses a description that is not a string or is over MAX_DESCRIPTION_CHARS; returns it."""
    return _text({"description": value}, "description", where, MAX_DESCRIPTION_CHARS)


def check_mask(value: Any, where: str = "adapter") -> str | None:
    """Refuses a mask kind that is not a string or is over MAX_MASK_CHARS; returns it."""
    return _text({"mask": value}, "mask", where, MAX_MASK_CHARS)


def _number(value: Any) -> float | None:
    """The value as a finite float, or None when it is not a finite JSON number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int past float range
        return None
    return number if math.isfinite(number) else None


def check_fingerprint(value: Any, where: str) -> dict[str, Any] | None:
    """A base_fingerprint ({id, structure, dtype: str, probes: {str: finite number}}) with float probes."""
    if value is None:
        return None
    if not isinstance(value, dict):
        _fail(where, "base_fingerprint", "an object", value)
    unknown = sorted(set(value) - set(FINGERPRINT_KEYS))
    if unknown:
        raise AdapterFormatError(f"{where}: 'base_fingerprint' has unknown keys {unknown[:3]}, "
                                 f"expected only {list(FINGERPRINT_KEYS)}")
    for key in ("id", "structure", "dtype"):
        _text(value, key, f"{where}, base_fingerprint")
    probes = value.get("probes")
    if probes is None:
        return dict(value)
    if not isinstance(probes, dict):
        _fail(where, "base_fingerprint.probes", "an object of weight name to number", probes)
    floats = {}
    for name, probe in probes.items():
        _string(name, where, "base_fingerprint.probes (a weight name)")
        floats[name] = _number(probe)
        if floats[name] is None:
            _fail(where, f"base_fingerprint.probes[{name}]", "a finite number", probe)
    return {**value, "probes": floats}


def _shape(layer: str, value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        _fail(where, f"shapes[{layer}]", "an array of positive integers", value)
    numel = 1
    for size in value:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= MAX_NUMEL:
            _fail(where, f"shapes[{layer}]", f"an array of integers in [1, {MAX_NUMEL}]", size)
        numel *= size
        if numel > MAX_NUMEL:
            raise AdapterFormatError(f"{where}: shape {value[:8]} of layer {_short(layer)} has more than "
                                     f"{MAX_NUMEL:,} elements")
    return tuple(value)


def _object(info: dict[str, Any], key: str, where: str, expected: str) -> dict[str, Any]:
    value = info.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(where, key, expected, value)
    return value


@dataclass
class AdapterHeader:
    """The checked ``shira`` metadata of a safetensors header. None means the field was absent."""

    shapes: dict[str, tuple[int, ...]]
    name: str | None = None
    mask: str | None = None
    description: str | None = None
    base_fingerprint: dict[str, Any] | None = None
    extra: dict[str, str] = field(default_factory=dict)
    nnz: dict[str, int] = field(default_factory=dict)


def adapter_header(text: Any, where: str, with_nnz: bool = False) -> AdapterHeader:
    """Parses and type-checks the ``shira`` header metadata.

    Args:
        text: the metadata value, JSON text.
        where: names it in errors, e.g. "header field 'shira'".
        with_nnz: read ``nnz`` (entries per layer before padding), which only PEFT files carry.

    Returns:
        The checked fields.
    """
    if not isinstance(text, str):
        _fail(where, "shira", "JSON text", text)
    info = parse_json(text, where)
    if not isinstance(info, dict):
        _fail(where, "shira", "a JSON object", info)
    if "shapes" not in info:
        raise AdapterFormatError(f"{where}: 'shapes' is missing (one [sizes] per adapted weight)")
    shapes = _object(info, "shapes", where, "an object of weight name to shape")
    for layer in shapes:
        _string(layer, where, "shapes (a weight name)")
    extra = _object(info, "extra", where, "an object of strings")
    for key, value in extra.items():
        _string(key, where, "extra (a key)")
        _string(value, where, f"extra[{key}]")
    nnz = _object(info, "nnz", where, "an object of weight name to count") if with_nnz else {}
    for layer, count in nnz.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            _fail(where, f"nnz[{layer}]", "a non-negative integer", count)
    return AdapterHeader(
        shapes={layer: _shape(layer, value, where) for layer, value in shapes.items()},
        name=_text(info, "name", where),
        mask=_text(info, "mask", where, MAX_MASK_CHARS),
        description=_text(info, "description", where, MAX_DESCRIPTION_CHARS),
        base_fingerprint=check_fingerprint(info.get("base_fingerprint"), where),
        extra=dict(extra),
        nnz=dict(nnz),
    )


def check_peft_config(config: Any, where: str) -> dict[str, Any]:
    """Type-checks the fields of PEFT's adapter_config.json that the importer reads; returns the config."""
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{where} must hold a JSON object, got {_kind(config)}")
    _text(config, "peft_type", where)
    _text(config, "base_model_name_or_path", where)
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{where} must give r as a positive integer, got {_kind(r)}")
    flag = config.get("fan_in_fan_out")
    if flag is not None and not isinstance(flag, bool):
        _fail(where, "fan_in_fan_out", "true, false or null", flag)
    targets = config.get("target_modules")
    if not (targets is None or isinstance(targets, str) or
            (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        _fail(where, "target_modules", "null, a string or an array of strings", targets)
    return config


def header_fields(adapter: Any) -> dict[str, Any]:
    """The `shira` header fields both file formats write for a SparseAdapter (the PEFT writer adds `nnz`)."""
    return {
        "name": adapter.name,
        "mask": adapter.mask,
        "description": adapter.description,
        "base_fingerprint": adapter.base_fingerprint,
        "extra": adapter.extra,
        "shapes": {d.name: list(d.shape) for d in adapter},
    }
