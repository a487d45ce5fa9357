"""Fuzz the adapter parsers: whatever the bytes, adapter_from_bytes and peft_from_bytes return an adapter or raise
a ShiraError, nothing else.

Three sources of input, each run with a fixed seed and a bounded number of examples: byte-level mutations of
valid files; safetensors files assembled from generated headers (every metadata field valid or arbitrary
JSON, every safetensors dtype for indices and values, odd shapes); and PEFT configs with generated fields.
Each test counts the examples it ran and asserts a minimum, so it cannot pass by running none.
"""

from __future__ import annotations

import json
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shira_core import BaseFingerprint, ShiraError, adapter_from_bytes, adapter_to_bytes, peft_from_bytes

from .adapter_bytes import NORM0, Q0, UP1, good_adapter, peft_pair

COUNTS: Counter[str] = Counter()
FUZZ = settings(
    derandomize=True, database=None, deadline=None, max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
    "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
    "C64": torch.complex64,
}
DTYPE_NAMES = [*TORCH_DTYPES, "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "Q9"]  # torch has no type for the last five
LAYERS = {Q0: [32, 32], UP1: [64, 32], NORM0: [32], "model.nope.weight": [4, 4]}
MODULES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.self_attn.k_proj": (16, 32),
           "model.layers.0.input_layernorm": (32,), "model.nope": (4, 4)}


@pytest.fixture(scope="module")
def base(tiny_llama) -> BaseFingerprint:
    return BaseFingerprint.of(tiny_llama(seed=0))


def outcome(kind: str, parse: Callable[[], Any]) -> None:
    """Runs one parse: an adapter or a ShiraError is fine; any other exception fails the test."""
    COUNTS[kind] += 1
    try:
        parse()
    except ShiraError:
        COUNTS[kind + ":refused"] += 1


def at_least(kind: str, run: Callable[[], None], minimum: int) -> None:
    before, start = COUNTS[kind], time.perf_counter()
    run()
    ran = COUNTS[kind] - before
    print(f"{kind}: {ran} parses ({COUNTS[kind + ':refused']} refused) in {time.perf_counter() - start:.1f} s")
    assert ran >= minimum, f"{kind} ran {ran} parses, expected at least {minimum}"


# --- JSON fragments: valid, wrong type, non-finite, huge, or nested far past the depth limit ------------------

lone_surrogates = st.sampled_from(["\ud800", "a\udfff"])
scalars = (st.none() | st.booleans() | st.integers(-(2**80), 2**80) | st.floats() | st.text(max_size=12)
           | lone_surrogates)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
odd_numbers = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-0.0", "9" * 5000, "1" + "0" * 400])
deep = st.builds(lambda n, kind: ("[" * n + "]" * n) if kind else ('{"a":' * n + "1" + "}" * n),
                 st.integers(40, 3000), st.booleans())
junk_values = json_values.map(json.dumps) | odd_numbers


def rarely(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int = 6) -> st.SearchStrategy[Any]:
    """`rare` one time in `one_in`, else `common`: junk everywhere at once would stop every file at the first
    check, so most parts stay valid and the parser gets deep."""
    return st.integers(1, one_in).flatmap(lambda i: rare if i == one_in else common)  # the simplest is common


junk = rarely(junk_values, deep, 5)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[str | None]:
    """A field's JSON text: mostly a valid value, sometimes absent (None) or junk."""
    return rarely(valid.map(json.dumps), st.none() | junk)


def json_object(fields: dict[str, str | None]) -> str:
    return "{" + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items() if v is not None) + "}"


@st.composite
def fingerprints(draw: st.DrawFn, base: BaseFingerprint) -> dict[str, Any]:
    real = base.to_dict([Q0, UP1, NORM0])
    probes = {k: draw(rarely(st.just(v), json_values | st.sampled_from([float("nan"), float("inf"), 10**400])))
              for k, v in real["probes"].items()}
    return {k: draw(rarely(st.just(v), json_values, 10)) for k, v in {**real, "probes": probes}.items()}


@st.composite
def shira_text(draw: st.DrawFn, base: BaseFingerprint, shapes: dict[str, list[int]], nnz: bool) -> str:
    """The ``shira`` header metadata: each field absent, valid or junk; sometimes junk as a whole."""
    fields = {
        "name": draw(field(rarely(st.text(max_size=20), lone_surrogates, 10))),
        "mask": draw(field(st.text(max_size=70))),
        "description": draw(field(rarely(st.text(max_size=30), st.just("d" * 5000), 10))),
        "base_fingerprint": draw(field(fingerprints(base))),
        "extra": draw(field(st.dictionaries(st.text(max_size=6), rarely(st.text(max_size=6), json_values),
                                            max_size=3))),
        "shapes": draw(rarely(st.just(json.dumps(shapes)), field(st.dictionaries(st.sampled_from(list(LAYERS)),
                                                                                  json_values)))),
        draw(st.text(max_size=6)): draw(st.none() | json_values.map(json.dumps)),
    }
    if nnz:
        fields["nnz"] = draw(field(st.dictionaries(st.sampled_from([*shapes, Q0]), st.integers(-3, 200))))
    return draw(rarely(st.just(json_object(fields)), junk, 12))


# --- safetensors files assembled from parts -------------------------------------------------------------------

any_dtype = st.sampled_from(DTYPE_NAMES)
index_dtypes = rarely(st.sampled_from(["I16", "I32", "I64", "I8", "U8"]), any_dtype, 3)
value_dtypes = rarely(st.sampled_from(["F16", "BF16", "F32", "F64"]), any_dtype, 3)


@st.composite
def tensor(draw: st.DrawFn, dtypes: st.SearchStrategy[str], shape: list[int],
           numbers: st.SearchStrategy[list[Any]]) -> tuple[str, list[int], bytes]:
    """(dtype name, shape, data): numbers encoded in the dtype, or raw bytes; the shape sometimes wrong."""
    dtype = draw(dtypes)
    count = 1
    for size in shape:
        count *= size
    if dtype in TORCH_DTYPES and draw(rarely(st.just(True), st.just(False), 10)):
        values = (draw(numbers) + [0] * count)[:count]
        data = torch.tensor(values).to(TORCH_DTYPES[dtype]).contiguous().view(torch.uint8).numpy().tobytes()
    else:
        data = draw(st.binary(min_size=0, max_size=96))
    odd = st.lists(st.integers(0, 70), max_size=3)
    return dtype, draw(rarely(st.just(shape), odd, 20)), data


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str | None]) -> bytes:
    header, body = {}, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(data)]}
        body += data
    text = json_object({"__metadata__": json_object(metadata), **{k: json.dumps(v) for k, v in header.items()}})
    return struct.pack("<Q", len(text.encode())) + text.encode() + body


def sorted_indices(numel: int) -> st.SearchStrategy[list[int]]:
    upper = min(max(numel - 1, 0), 2**40)  # an odd shape may claim 2**70 elements
    return st.lists(st.integers(-2, upper + 2), max_size=8).map(sorted) | st.lists(st.integers(0, upper),
                                                                                    max_size=8, unique=True).map(sorted)


values_lists = st.lists(st.floats(width=32) | st.integers(-(2**15), 2**15), max_size=8)


@st.composite
def native_files(draw: st.DrawFn, base: BaseFingerprint) -> bytes:
    tensors, shapes = {}, {}
    for layer in draw(st.lists(st.sampled_from(list(LAYERS)), max_size=3, unique=True)):
        odd = st.lists(st.integers(-2, 40) | st.just(2**70), max_size=3)
        shape = draw(rarely(st.just(LAYERS[layer]), odd))
        numel = 1
        for size in shape:
            numel *= size
        nnz = draw(st.integers(0, 6))
        tensors[layer + ".indices"] = draw(tensor(index_dtypes, [nnz], sorted_indices(numel)))
        length = draw(rarely(st.just(nnz), st.integers(0, 8)))
        tensors[layer + ".values"] = draw(tensor(value_dtypes, [length], values_lists))
        shapes[layer] = shape
    metadata = {
        "format": draw(rarely(st.just('"shira-sparse"'), junk, 20)),
        "format_version": draw(rarely(st.just('"1"'), junk, 20)),
        "shira": json.dumps(draw(shira_text(base, shapes, nnz=False))),
    }
    return safetensors_bytes(tensors, metadata)


@st.composite
def peft_weights(draw: st.DrawFn, base: BaseFingerprint) -> bytes:
    tensors, shapes = {}, {}
    for module in draw(st.lists(st.sampled_from(list(MODULES)), min_size=1, max_size=2, unique=True)):
        shape = MODULES[module]
        n = draw(rarely(st.sampled_from([sum(shape), 2 * sum(shape)]), st.integers(0, 6)))
        pairs = rarely(st.lists(st.integers(0, 15), min_size=2 * n, max_size=2 * n),
                       st.lists(st.integers(-1, 33), min_size=2 * n, max_size=2 * n))
        key = "base_model.model." + module
        tensors[key + ".shira_indices"] = draw(tensor(index_dtypes | st.just("F32"), [2, n], pairs))
        tensors[key + ".shira_weight"] = draw(tensor(value_dtypes, [n], values_lists))
        shapes[module + ".weight"] = list(shape)
    metadata = {"format": '"pt"', "shira": draw(st.none() | shira_text(base, shapes, nnz=True).map(json.dumps))}
    return safetensors_bytes(tensors, metadata)


def peft_configs() -> st.SearchStrategy[str]:
    """adapter_config.json text: every field the importer reads, valid or junk, plus an unknown one."""
    fields = st.fixed_dictionaries({
        "peft_type": rarely(st.just('"SHIRA"'), junk),
        "r": rarely(st.sampled_from(["1", "2"]), junk),
        "target_modules": field(st.lists(st.text(max_size=8), max_size=3) | st.text(max_size=8)),
        "base_model_name_or_path": field(st.text(max_size=8)),
        "fan_in_fan_out": field(st.booleans()),
        "task_type": field(json_values),
    })
    return rarely(fields.map(json_object), junk, 12)


# --- byte-level mutations of valid files ---------------------------------------------------------------------

OPS = ["flip", "set", "insert", "delete", "truncate", "length"]
where = st.integers(0, 4096) | st.integers(0, 2**64 - 1)
edits = st.lists(st.tuples(st.sampled_from(OPS), where, st.binary(min_size=1, max_size=8)), min_size=1, max_size=4)


def mutate(data: bytes, steps: list[tuple[str, int, bytes]]) -> bytes:
    out = bytearray(data)
    for op, number, blob in steps:
        at = number % (len(out) + 1)
        if op == "flip" and out:
            out[at % len(out)] ^= 1 << (blob[0] % 8)
        elif op == "set":
            out[at : at + len(blob)] = blob
        elif op == "insert":
            out[at:at] = blob
        elif op == "delete":
            del out[at : at + blob[0] % 32 + 1]
        elif op == "truncate":
            del out[at:]
        elif op == "length":  # the 8-byte header size: near the real one, or anything
            real = struct.unpack("<Q", bytes(out[:8]).ljust(8, b"\0"))[0]
            claimed = number if blob[0] % 2 else max(real + (blob[-1] - 128), 0)
            out[:8] = struct.pack("<Q", claimed % 2**64)
    return bytes(out)


@FUZZ
@given(steps=edits, with_base=st.booleans())
def native_mutations(base: BaseFingerprint, steps: list[tuple[str, int, bytes]], with_base: bool) -> None:
    data = mutate(adapter_to_bytes(good_adapter(base.to_dict([Q0, UP1]))), steps)
    outcome("native mutations", lambda: adapter_from_bytes(data, base=base if with_base else None))


@FUZZ
@given(steps=edits, in_config=st.booleans(), with_base=st.booleans())
def peft_mutations(base: BaseFingerprint, steps: list[tuple[str, int, bytes]], in_config: bool,
                   with_base: bool) -> None:
    config, weights = peft_pair(base.to_dict([Q0, UP1]))
    config, weights = (mutate(config, steps), weights) if in_config else (config, mutate(weights, steps))
    outcome("peft mutations", lambda: peft_from_bytes(config, weights, base=base if with_base else None))


@FUZZ
@given(data=st.data(), with_base=st.booleans())
def native_structures(base: BaseFingerprint, data: st.DataObject, with_base: bool) -> None:
    blob = data.draw(native_files(base))
    outcome("native headers", lambda: adapter_from_bytes(blob, base=base if with_base else None))


@FUZZ
@given(data=st.data(), with_base=st.booleans())
def peft_structures(base: BaseFingerprint, data: st.DataObject, with_base: bool) -> None:
    config = data.draw(rarely(st.just(peft_pair()[0].decode()), peft_configs(), 2))
    weights = data.draw(peft_weights(base))
    outcome("peft files", lambda: peft_from_bytes(config.encode(), weights, base=base if with_base else None))


@FUZZ
@given(config=peft_configs(), with_base=st.booleans())
def peft_config_fields(base: BaseFingerprint, config: str, with_base: bool) -> None:
    weights = peft_pair(base.to_dict([Q0]))[1]
    outcome("peft configs", lambda: peft_from_bytes(config.encode(), weights, base=base if with_base else None))


@pytest.mark.parametrize(
    ("kind", "prop"),
    [("native mutations", native_mutations), ("peft mutations", peft_mutations),
     ("native headers", native_structures), ("peft files", peft_structures), ("peft configs", peft_config_fields)],
)
def test_parsers_raise_only_shira_errors(base, kind, prop):
    at_least(kind, lambda: prop(base), 300)
