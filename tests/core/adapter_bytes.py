"""Helpers for parser tests: valid native and PEFT adapter bytes, and edits of their headers and tensors."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shira_core import SparseAdapter, SparseDelta, peft_to_bytes

Q0 = "model.layers.0.self_attn.q_proj.weight"
UP1 = "model.layers.1.mlp.up_proj.weight"
NORM0 = "model.layers.0.input_layernorm.weight"
PEFT_Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def good_adapter(fingerprint: dict[str, Any] | None = None) -> SparseAdapter:
    """Two 2-D layers of tiny_llama, values in fp32 and bf16."""
    q = SparseDelta(Q0, (32, 32), torch.tensor([0, 3, 77, 1023]), torch.tensor([0.5, -1.25, 2.0, 1e-3]))
    up = SparseDelta(UP1, (64, 32), torch.tensor([5, 6, 2047]), torch.tensor([1.0, -2.0, 3.5], dtype=torch.bfloat16))
    return SparseAdapter("tone", {Q0: q, UP1: up}, "wm", fingerprint, "hand built", {"task": "tone"})


def header_of(data: bytes) -> dict[str, Any]:
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size])


def shira_info(data: bytes) -> dict[str, Any]:
    """The decoded ``shira`` metadata of native or PEFT bytes written here."""
    return json.loads(header_of(data)["__metadata__"]["shira"])


def resave(
    data: bytes,
    info: Callable[[dict[str, Any]], Any] | None = None,
    shira_text: str | None = None,
    **tensors: torch.Tensor,
) -> bytes:
    """Re-saves safetensors bytes with the ``shira`` metadata edited and tensors replaced.

    Args:
        data: native or PEFT weights bytes written here.
        info: takes the decoded metadata dict, edits it in place (or returns a replacement).
        shira_text: replaces the metadata text outright (for JSON that json.dumps would not write).
        tensors: replacements by name, '__' standing for '.'.
    """
    meta = dict(header_of(data)["__metadata__"])
    if info is not None:
        decoded = json.loads(meta["shira"])
        replaced = info(decoded)
        meta["shira"] = json.dumps(decoded if replaced is None else replaced)
    if shira_text is not None:
        meta["shira"] = shira_text
    loaded = st_load(data)
    loaded.update({k.replace("__", "."): v for k, v in tensors.items()})
    return st_save(loaded, metadata=meta)


def raw_safetensors(header_text: bytes, body: bytes = b"") -> bytes:
    """Bytes with a header given verbatim: for headers that json.dumps could not write."""
    return struct.pack("<Q", len(header_text)) + header_text + body


def peft_pair(fingerprint: dict[str, Any] | None = None) -> tuple[bytes, bytes]:
    """(adapter_config.json, adapter_model.safetensors) of good_adapter, with the ``shira`` header metadata."""
    return peft_to_bytes(good_adapter(fingerprint))


def edit_config(config_json: bytes, **fields: Any) -> bytes:
    config = json.loads(config_json)
    config.update(fields)
    return json.dumps(config).encode()
