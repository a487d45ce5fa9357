"""Hostile uploads, each once: every one must end in the project's own error class, never in a crash."""

from __future__ import annotations

import json
import math
import struct
import time

import pytest
import torch
from safetensors.torch import load as st_load

from shira_core import AdapterFormatError, BaseFingerprint, ShiraError, SparseAdapter, SparseDelta
from shira_core.errors import NotAdaptableError, UnsupportedDtypeError
from shira_core.io import adapter_from_bytes, adapter_to_bytes, read_safetensors_header
from shira_core.metadata import MAX_DESCRIPTION_CHARS, MAX_HEADER_BYTES, MAX_MASK_CHARS, json_depth
from shira_core.peft_interop import peft_from_bytes

from .adapter_bytes import (
    NORM0,
    PEFT_Q0,
    Q0,
    UP1,
    edit_config,
    good_adapter,
    peft_pair,
    raw_safetensors,
    resave,
)

DEEP = 100_000
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


@pytest.fixture(scope="module")
def base(tiny_llama) -> BaseFingerprint:
    return BaseFingerprint.of(tiny_llama(seed=0))


@pytest.fixture(scope="module")
def native(base) -> bytes:
    return adapter_to_bytes(good_adapter(base.to_dict([Q0, UP1])))


@pytest.fixture(scope="module")
def peft(base) -> tuple[bytes, bytes]:
    return peft_pair(base.to_dict([Q0, UP1]))


def refused(error: type[ShiraError], match: str, parse, *args, **kwargs) -> None:
    """Calls parse(*args, **kwargs) and checks it raises exactly `error` with a message matching `match`."""
    with pytest.raises(error, match=match) as info:
        parse(*args, **kwargs)
    assert type(info.value) is error


# --- JSON nested 100k deep, and oversized headers --------------------------------------------------------------

def test_deeply_nested_safetensors_header():
    data = raw_safetensors(b"[" * DEEP + b"]" * DEEP)
    refused(AdapterFormatError, r"header nests 100,000 levels deep, over the limit of 64", adapter_from_bytes, data)
    data = raw_safetensors(b'{"__metadata__": {"x": ' + b"{\"a\": " * DEEP + b"1" + b"}" * DEEP + b"}}")
    refused(AdapterFormatError, r"nests 100,00\d levels deep", read_safetensors_header, data)


def test_deeply_nested_shira_metadata(native, peft):
    deep = "[" * DEEP + "]" * DEEP
    refused(AdapterFormatError, r"'shira' nests 100,000 levels", adapter_from_bytes, resave(native, shira_text=deep))
    config, weights = peft
    refused(AdapterFormatError, r"'shira' nests 100,000 levels", peft_from_bytes, config,
            resave(weights, shira_text=deep))


def test_deeply_nested_peft_config(peft):
    config, weights = peft
    deep = b'{"peft_type": "SHIRA", "r": 1, "x": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    refused(AdapterFormatError, r"adapter_config\.json nests 100,001 levels deep", peft_from_bytes, deep, weights)


def test_header_over_the_size_limit():
    text = b"{" + b" " * MAX_HEADER_BYTES + b"}"
    refused(AdapterFormatError, r"header is 16,777,218 bytes, over the limit of 16,777,216", adapter_from_bytes,
            raw_safetensors(text))


def test_depth_ignores_brackets_in_strings_and_is_fast():
    assert json_depth(b'{"a": "[[[[\\"[[[", "b": [[1]]}') == 3
    assert json_depth(b'["\\\\", [[["x"]]]]') == 4  # an escaped backslash does not escape the quote after it
    many = json.dumps({f"layer.{i}": [[i, "]]]"], {"k": "[{"}] for i in range(60_000)}).encode()
    start = time.perf_counter()
    assert json_depth(many) == 3
    assert time.perf_counter() - start < 2.0, f"{len(many):,} bytes took too long"  # about 0.1 s alone


# --- value dtypes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_values_native(native, base, dtype):
    data = resave(native, **{Q0.replace(".", "__") + "__values": torch.ones(4).to(dtype)})
    for kwargs in ({}, {"base": base}):
        refused(UnsupportedDtypeError, rf"values are {str(dtype)[6:]} for layer {Q0} of adapter 'tone'; "
                r"accepted value dtypes are float16, bfloat16, float32, float64", adapter_from_bytes, data, **kwargs)


@pytest.mark.parametrize("dtype", FLOAT8, ids=str)
def test_float8_values_peft(peft, base, dtype):
    config, weights = peft
    key = PEFT_Q0 + ".shira_weight"
    weights = resave(weights, **{key.replace(".", "__"): st_load(weights)[key].to(dtype)})  # only the dtype changes
    refused(UnsupportedDtypeError, rf"values are {str(dtype)[6:]} for layer {Q0}", peft_from_bytes, config, weights,
            base=base)


def test_dtype_refusal_is_not_a_format_error():
    assert not issubclass(UnsupportedDtypeError, AdapterFormatError)
    assert not issubclass(NotAdaptableError, AdapterFormatError)


# --- the base fingerprint in the header ------------------------------------------------------------------------

def _fingerprint(**changes):
    def edit(info):
        info["base_fingerprint"].update(changes)
    return edit


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"probes": [1, 2]}, r"'base_fingerprint.probes' must be an object .*got an array"),
        ({"probes": {Q0: "0.5"}}, r"'base_fingerprint.probes\[.*q_proj.weight\]' must be a finite number, got a str"),
        ({"probes": {Q0: math.nan}}, r"probes\[.*q_proj.weight\]' must be a finite number, got a number nan"),
        ({"probes": {Q0: math.inf}}, r"must be a finite number, got a number inf"),
        ({"probes": {Q0: 10**400}}, r"must be a finite number"),
        ({"structure": 5}, r"'structure' must be a string, got a number 5"),
    ],
)
def test_bad_fingerprint_native(native, base, changes, message):
    data = resave(native, _fingerprint(**changes))
    refused(AdapterFormatError, message, adapter_from_bytes, data, base=base)
    refused(AdapterFormatError, message, adapter_from_bytes, data)  # refused by the parser, base or not


def test_bad_fingerprint_set_in_code_is_refused_by_check(base):
    fingerprint = base.to_dict([Q0])
    for probes in ({Q0: math.nan}, {Q0: "0.5"}, [0.5]):
        adapter = SparseAdapter("coded", {}, base_fingerprint={**fingerprint, "probes": probes})
        refused(AdapterFormatError, r"adapter 'coded': 'base_fingerprint.probes", base.check, adapter)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda info: info.update(base_fingerprint="zzz"), r"'base_fingerprint' must be an object, got a string 'zzz'"),
        (lambda info: info.update(extra=[1]), r"'extra' must be an object of strings, got an array"),
        (_fingerprint(probes={Q0: math.nan}), r"'base_fingerprint.probes\[.*\]' must be a finite number, got .* nan"),
    ],
    ids=["fingerprint a string", "extra an array", "NaN probe"],
)
def test_bad_peft_header(peft, base, edit, message):
    config, weights = peft
    refused(AdapterFormatError, message, peft_from_bytes, config, resave(weights, edit), base=base)


# --- the PEFT config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_modules": 5}, r"'target_modules' must be null, a string or an array of strings, got a number 5"),
        ({"target_modules": [1, "q"]}, r"'target_modules' must be null, a string or an array of strings"),
        ({"base_model_name_or_path": {"a": 1}}, r"'base_model_name_or_path' must be a string, got an object"),
        ({"fan_in_fan_out": 1}, r"'fan_in_fan_out' must be true, false or null, got a number 1"),
        ({"peft_type": ["SHIRA"]}, r"'peft_type' must be a string, got an array"),
        ({"r": 2.0}, r"r as a positive integer, got a number 2\.0"),
    ],
)
def test_bad_peft_config_fields(peft, base, fields, message):
    config, weights = peft
    refused(AdapterFormatError, message, peft_from_bytes, edit_config(config, **fields), weights, base=base)


# --- size limits on free text ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("field", "size", "message"),
    [("description", 4_000_000, r"'description' is 4,000,000 characters, over the limit of 4,096"),
     ("mask", MAX_MASK_CHARS + 1, r"'mask' is 65 characters, over the limit of 64")],
)
def test_description_and_mask_limits(native, peft, field, size, message):
    config, weights = peft
    def edit(info):
        info[field] = "x" * size
    refused(AdapterFormatError, message, adapter_from_bytes, resave(native, edit))
    refused(AdapterFormatError, message, peft_from_bytes, config, resave(weights, edit))


def test_text_at_the_limits_is_kept_and_over_them_never_written(native):
    at_limit = {"description": "d" * MAX_DESCRIPTION_CHARS, "mask": "m" * MAX_MASK_CHARS}
    adapter = adapter_from_bytes(resave(native, lambda info: info.update(at_limit)))
    assert len(adapter.description) == MAX_DESCRIPTION_CHARS and len(adapter.mask) == MAX_MASK_CHARS
    with pytest.raises(AdapterFormatError, match=r"adapter 'long': 'description' is 4,097 characters"):
        adapter_to_bytes(SparseAdapter("long", {}, description="d" * (MAX_DESCRIPTION_CHARS + 1)))


def test_lone_surrogates_in_text_fields(native, peft):
    """json.loads turns a \\ud800 escape into a lone surrogate, which no UTF-8 writer (Redis, HTTP) accepts."""
    refused(AdapterFormatError, r"'name' is not valid Unicode text", adapter_from_bytes,
            resave(native, lambda info: info.update(name="\ud800")))
    config, weights = peft
    refused(AdapterFormatError, r"'base_model_name_or_path' is not valid Unicode text", peft_from_bytes,
            edit_config(config, base_model_name_or_path="x\udc00"), weights)


# --- adaptable weights -----------------------------------------------------------------------------------------

def test_delta_on_a_weight_that_cannot_be_switched(base):
    norm = SparseDelta(NORM0, (32,), torch.tensor([1, 2]), torch.tensor([0.5, 0.5]))
    data = adapter_to_bytes(SparseAdapter("norms", {NORM0: norm}))
    assert adapter_from_bytes(data).nnz == 2  # the file itself is fine
    refused(NotAdaptableError, r"adapter 'norms' changes layer model\.layers\.0\.input_layernorm\.weight of shape "
            r"\[32\], which cannot be switched: only floating-point weights with 2 or more dimensions can be "
            "switched", adapter_from_bytes, data, base=base)
    assert NORM0 not in base.adaptable and Q0 in base.adaptable


def test_shapes_only_fingerprint_takes_2d_weights_as_adaptable(base):
    shapes_only = BaseFingerprint(dict(base.shapes), {}, "meta")
    norm = SparseDelta(NORM0, (32,), torch.tensor([1]), torch.tensor([0.5]))
    refused(NotAdaptableError, "input_layernorm", shapes_only.check, SparseAdapter("n", {NORM0: norm}))
    shapes_only.check(good_adapter())


def test_truncated_length_prefix_claims_a_huge_header(native):
    data = struct.pack("<Q", 2**63) + native[8:]
    refused(AdapterFormatError, r"header claims", adapter_from_bytes, data)
