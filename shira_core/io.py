"""The native file format: one .safetensors file, adapter metadata in its header. Nothing is ever unpickled.

Tensors are ``<weight name>.indices`` and ``<weight name>.values``. The header key ``shira`` holds JSON with
the adapter name, mask kind, description, base fingerprint and the shape of every adapted weight.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .delta import SparseAdapter, SparseDelta
from .errors import AdapterFormatError
from .fingerprint import BaseFingerprint
from .metadata import MAX_HEADER_BYTES, adapter_header, check_description, check_mask, header_fields, parse_json

FORMAT = "shira-sparse"
FORMAT_VERSION = "1"
INDEX_SUFFIX = ".indices"
VALUE_SUFFIX = ".values"
INT_DTYPES = {torch.int16, torch.int32, torch.int64, torch.uint8, torch.int8}


def adapter_to_bytes(adapter: SparseAdapter) -> bytes:
    """Serialises an adapter to the native safetensors bytes."""
    check_free_text(adapter)
    tensors: dict[str, torch.Tensor] = {}
    for delta in adapter:
        tensors[delta.name + INDEX_SUFFIX] = delta.indices.detach().cpu().contiguous()
        tensors[delta.name + VALUE_SUFFIX] = delta.values.detach().cpu().contiguous()
    header = header_fields(adapter)
    blob = st_save(tensors, metadata={"format": FORMAT, "format_version": FORMAT_VERSION, "shira": json.dumps(header)})
    return _sorted_header(blob)


def check_free_text(adapter: SparseAdapter) -> None:
    """Refuses to write a description or mask that the parsers would refuse to read back."""
    check_description(adapter.description, f"adapter {adapter.name!r}")
    check_mask(adapter.mask, f"adapter {adapter.name!r}")


def _sorted_header(blob: bytes) -> bytes:
    # safetensors writes the metadata from a hash map, in a different order on every call; sorting the keys
    # makes equal adapters give equal bytes (content hashes, caches). Tensor offsets do not move.
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the data section 8-byte aligned
    return struct.pack("<Q", len(text)) + text + blob[8 + size :]


def save_adapter(adapter: SparseAdapter, path: str | os.PathLike[str]) -> Path:
    """Writes the adapter atomically (temp file, then rename) and returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(adapter_to_bytes(adapter))
    os.replace(tmp, path)
    return path


def read_safetensors_header(data: bytes) -> dict[str, Any]:
    """Parses a safetensors header without touching tensor data; raises AdapterFormatError when malformed."""
    if len(data) < 8:
        raise AdapterFormatError(f"not a safetensors file: {len(data)} bytes is shorter than the 8-byte header size")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise AdapterFormatError(f"not a safetensors file: header claims {size:,} bytes but the file has {len(data):,}")
    if size > MAX_HEADER_BYTES:
        raise AdapterFormatError(f"safetensors header is {size:,} bytes, over the limit of {MAX_HEADER_BYTES:,}")
    header = parse_json(data[8 : 8 + size], "safetensors header")
    if not isinstance(header, dict):
        raise AdapterFormatError("not a safetensors file: header is not a JSON object")
    return header


def header_metadata(data: bytes) -> dict[str, Any]:
    """The ``__metadata__`` object of a safetensors header ({} when absent); AdapterFormatError when malformed."""
    meta = read_safetensors_header(data).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise AdapterFormatError(f"header field '__metadata__' must be a JSON object, got {type(meta).__name__}")
    return meta


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Loads the tensors of a safetensors blob, wrapping the parser's errors."""
    read_safetensors_header(data)
    try:
        return st_load(data)
    except Exception as e:  # safetensors raises its own SafetensorError and ValueErrors
        raise AdapterFormatError(f"safetensors data is corrupt: {e}") from e


def adapter_from_bytes(data: bytes, base: BaseFingerprint | None = None, name: str | None = None) -> SparseAdapter:
    """Parses and validates native adapter bytes.

    Args:
        data: the file contents.
        base: when given, the adapter must fit this base model (names, shapes, fingerprint).
        name: overrides the name stored in the file.

    Returns:
        The validated SparseAdapter, on CPU.
    """
    meta = header_metadata(data)
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(
            f"not a native shira adapter: header format is {meta.get('format')!r}, expected {FORMAT!r} "
            "(PEFT SHiRA adapters go through shira_core.peft_interop or `shira convert`)"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(
            f"unsupported format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION!r}"
        )
    if "shira" not in meta:
        raise AdapterFormatError("header field 'shira' is missing: a native adapter records its layers there")
    info = adapter_header(meta["shira"], "header field 'shira'")
    tensors = load_tensors(data)
    expected = {n + s for n in info.shapes for s in (INDEX_SUFFIX, VALUE_SUFFIX)}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise AdapterFormatError(f"tensors do not match the header: missing {missing[:3]}, unexpected {extra[:3]}")
    deltas = {}
    for layer, shape in info.shapes.items():
        idx, vals = tensors[layer + INDEX_SUFFIX], tensors[layer + VALUE_SUFFIX]
        if idx.dtype not in INT_DTYPES or idx.dim() != 1:
            raise AdapterFormatError(
                f"indices of layer {layer} must be a 1-D int tensor, got {idx.dtype} {list(idx.shape)}"
            )
        if not vals.dtype.is_floating_point or vals.dim() != 1:
            raise AdapterFormatError(
                f"values of layer {layer} must be a 1-D float tensor, got {vals.dtype} {list(vals.shape)}"
            )
        deltas[layer] = SparseDelta(layer, shape, idx, vals)
    adapter = SparseAdapter(
        name=name or info.name or "adapter",
        deltas=deltas,
        mask=info.mask or "unknown",
        base_fingerprint=info.base_fingerprint,
        description=info.description or "",
        extra=info.extra,
    )
    adapter.validate()
    if base is not None:
        base.check(adapter)
    return adapter


def load_adapter(
    path: str | os.PathLike[str], base: BaseFingerprint | None = None, name: str | None = None
) -> SparseAdapter:
    """Reads a native adapter file; see adapter_from_bytes."""
    return adapter_from_bytes(Path(path).read_bytes(), base=base, name=name)
