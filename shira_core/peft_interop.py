"""PEFT's SHiRA format, read: a directory holding adapter_config.json and adapter_model.safetensors (never pickles).

PEFT stores, per adapted nn.Linear ``<module>``, the tensors ``base_model.model.<module>.shira_indices``
(int32, shape [2, n], (row, col) pairs in any order) and ``base_model.model.<module>.shira_weight`` (float,
shape [n], one value per pair). Its delta is ``scaling * weight`` at those pairs; ``scaling`` is not saved and
is 1.0 on load. Duplicate pairs add (PEFT builds an uncoalesced sparse COO tensor), so the importer sums them.

Two PEFT constraints shape the exporter:
- every layer holds exactly ``r * (in + out)`` entries, with one ``r`` for the whole adapter (ShiraConfig has
  no rank_pattern); a checkpoint with another count fails PeftModel.from_pretrained with a size mismatch.
  So the exporter picks the smallest r that fits every layer and pads each layer with zero-valued entries
  at positions it does not touch: zeros change nothing, so PEFT computes the same weights.
- PEFT does not record weight shapes, so importing a file PEFT wrote needs the base model's fingerprint.
  Files written here also carry the shapes, name, mask and fingerprint in the safetensors header under
  ``shira`` (PEFT ignores header metadata), and the real entry counts, so re-import drops the padding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .delta import SparseAdapter, SparseDelta, check_value_dtype
from .errors import (
    AdapterFormatError,
    IndexRangeError,
    LengthMismatchError,
    ShapeMismatchError,
    UnknownLayerError,
)
from .fingerprint import BaseFingerprint
from .io import header_metadata, load_tensors
from .metadata import AdapterHeader, adapter_header, check_peft_config, parse_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
INDEX_KEY = ".shira_indices"
WEIGHT_KEY = ".shira_weight"
META_KEY = "shira"
# PEFT saves indices as int32, or float32 on Windows; these are the dtypes that hold (row, col) pairs.
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
                torch.float64)


def _config(config_json: bytes) -> dict[str, Any]:
    config = check_peft_config(parse_json(config_json, CONFIG_FILE), CONFIG_FILE)
    if config.get("peft_type") != "SHIRA":
        raise AdapterFormatError(
            f"{CONFIG_FILE} has peft_type {config.get('peft_type')!r}; only SHIRA adapters can be imported "
            "(other PEFT methods such as LoRA are not sparse deltas)"
        )
    if config.get("fan_in_fan_out"):
        raise AdapterFormatError(
            f"{CONFIG_FILE} sets fan_in_fan_out=true: PEFT SHiRA only adapts nn.Linear weights stored as "
            "[out, in] (it resets this flag to false), so a file carrying true was not made for them; "
            "set it to false if the indices are (row, col) of the [out, in] weight"
        )
    return config


def _header_info(safetensors: bytes) -> AdapterHeader | None:
    """The metadata save_peft_adapter writes into the header, or None for files PEFT wrote."""
    meta = header_metadata(safetensors)
    if META_KEY not in meta:
        return None
    return adapter_header(meta[META_KEY], f"{WEIGHTS_FILE} header field {META_KEY!r}", with_nnz=True)


def peft_records_shapes(safetensors: bytes) -> bool:
    """True when the file carries weight shapes (written by save_peft_adapter), so no base model is needed."""
    info = _header_info(safetensors)
    return info is not None and bool(info.shapes)


def _pairs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name (without PEFT's prefix) -> (indices [2, n], weights [n])."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in (INDEX_KEY, WEIGHT_KEY) if key.endswith(s)), None)
        if suffix is None:
            raise AdapterFormatError(
                f"{WEIGHTS_FILE} holds {key}, which is not a SHiRA tensor (modules_to_save or another "
                f"method?); only *{INDEX_KEY} and *{WEIGHT_KEY} can be imported"
            )
        module = key[: -len(suffix)].removeprefix(PREFIX)
        found.setdefault(module, {})[suffix] = tensor
    out = {}
    for module, parts in sorted(found.items()):
        missing = [s.lstrip(".") for s in (INDEX_KEY, WEIGHT_KEY) if s not in parts]
        if missing:
            raise AdapterFormatError(f"{WEIGHTS_FILE} has no {missing[0]} for module {module}")
        out[module] = (parts[INDEX_KEY], parts[WEIGHT_KEY])
    if not out:
        raise AdapterFormatError(f"{WEIGHTS_FILE} holds no SHiRA tensors")
    return out


def _delta(layer: str, shape: tuple[int, ...], idx: torch.Tensor, w: torch.Tensor, r: int, keep: int | None,
           adapter: str) -> SparseDelta:
    """Checks one PEFT layer against its weight shape and turns it into sorted flat indices and values."""
    where = f"for layer {layer} of adapter {adapter!r}"
    if idx.dim() != 2 or idx.shape[0] != 2:
        raise AdapterFormatError(f"shira_indices must be [2, n] (row, col pairs), not {list(idx.shape)} {where}")
    if w.dim() != 1 or not w.dtype.is_floating_point:
        raise AdapterFormatError(f"shira_weight must be 1-D float, got {w.dtype} {list(w.shape)} {where}")
    check_value_dtype(w.dtype, where)  # before any arithmetic: float8 has no index_add_
    if idx.shape[1] != w.numel():
        raise LengthMismatchError(f"indices and weights differ: {idx.shape[1]:,} vs {w.numel():,} {where}")
    if len(shape) != 2:
        raise ShapeMismatchError(f"PEFT SHiRA adapts 2-D nn.Linear weights, not shape {list(shape)} {where}")
    out_f, in_f = shape
    if w.numel() != r * (in_f + out_f):
        raise ShapeMismatchError(
            f"{w.numel():,} entries, but PEFT gives a [{out_f}, {in_f}] weight r*(in+out) = "
            f"{r}*{in_f + out_f} = {r * (in_f + out_f):,} {where}: the adapter was made for a weight of "
            "another shape, or r is wrong"
        )
    if idx.dtype not in INDEX_DTYPES:
        raise AdapterFormatError(f"shira_indices must be signed integers, got {idx.dtype} {where}")
    if idx.dtype.is_floating_point and not bool((idx == idx.round()).all()):
        raise AdapterFormatError(f"shira_indices holds non-integer values {where}")
    rows, cols = idx[0].to(torch.int64), idx[1].to(torch.int64)
    for axis, vec, size in (("row", rows, out_f), ("column", cols, in_f)):
        if vec.numel() and (int(vec.min()) < 0 or int(vec.max()) >= size):
            raise IndexRangeError(
                f"{axis} index out of range: [{int(vec.min()):,}, {int(vec.max()):,}] but the weight of "
                f"shape {list(shape)} has {size:,} {axis}s {where}"
            )
    if keep is not None and keep <= w.numel() and not bool(w[keep:].any()):
        rows, cols, w = rows[:keep], cols[:keep], w[:keep]  # padding written by save_peft_adapter
    flat = rows * in_f + cols
    order = torch.argsort(flat, stable=True)
    flat, w = flat[order], w[order]
    uniq, inverse = torch.unique_consecutive(flat, return_inverse=True)
    if uniq.numel() != flat.numel():  # PEFT adds duplicate pairs; do the same
        w = torch.zeros(uniq.numel(), dtype=w.dtype).index_add_(0, inverse, w)
    return SparseDelta(layer, shape, uniq, w.clone())


def peft_from_bytes(
    config_json: bytes, safetensors: bytes, base: BaseFingerprint | None = None, name: str | None = None
) -> SparseAdapter:
    """Parses and validates a PEFT SHiRA adapter given as the two files' contents.

    Args:
        config_json: contents of adapter_config.json.
        safetensors: contents of adapter_model.safetensors.
        base: the base model's fingerprint. Required for files PEFT wrote (they do not record weight shapes);
            when given, the adapter must also fit it (names, shapes, fingerprint).
        name: adapter name; default the one recorded by save_peft_adapter, else "peft-adapter".

    Returns:
        The validated SparseAdapter, on CPU, with mask "peft" (or the recorded one) and extra peft_r,
        peft_target_modules and peft_base_model_name_or_path.
    """
    config = _config(config_json)
    info = _header_info(safetensors) or AdapterHeader(shapes={})
    pairs = _pairs(load_tensors(safetensors))
    label = name or info.name or "peft-adapter"
    shapes = info.shapes
    deltas = {}
    for module, (idx, w) in pairs.items():
        layer = module + ".weight"
        shape = shapes.get(layer) or (base.shapes.get(layer) if base is not None else None)
        if shape is None:
            if base is None:
                raise AdapterFormatError(
                    "PEFT SHiRA files do not record weight shapes; pass the base model (base="
                    f"BaseFingerprint.of(model), or --base on the command line) to import adapter {label!r}"
                )
            raise UnknownLayerError(
                f"adapter {label!r} targets {layer}, which the base model does not have "
                f"({len(base.shapes)} parameters, e.g. {next(iter(base.shapes))})"
            )
        deltas[layer] = _delta(layer, tuple(shape), idx, w, config["r"], info.nnz.get(layer), label)
    targets = config.get("target_modules") or []
    extra = dict(info.extra)
    extra["peft_r"] = str(config["r"])
    # A string is one regex over module names; a list names modules.
    extra["peft_target_modules"] = json.dumps(targets if isinstance(targets, str) else sorted(targets))
    if config.get("base_model_name_or_path"):
        extra["peft_base_model_name_or_path"] = config["base_model_name_or_path"]
    adapter = SparseAdapter(
        name=label,
        deltas=deltas,
        mask=info.mask or "peft",
        base_fingerprint=info.base_fingerprint,
        description=info.description or f"imported from PEFT SHiRA (r={config['r']})",
        extra=extra,
    )
    adapter.validate()
    if base is not None:
        base.check(adapter)
    return adapter


def load_peft_adapter(
    directory: str | os.PathLike[str], base: BaseFingerprint | None = None, name: str | None = None
) -> SparseAdapter:
    """Reads a PEFT SHiRA adapter directory; see peft_from_bytes. The name defaults to the directory name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory} is not a directory; a PEFT adapter is a folder with {CONFIG_FILE}")
    for needed in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / needed).is_file():
            hint = " (pickled adapter_model.bin files are never loaded; re-save with safe_serialization=True)"
            bin_only = needed == WEIGHTS_FILE and (directory / "adapter_model.bin").exists()
            raise AdapterFormatError(f"{directory} has no {needed}{hint if bin_only else ''}")
    safetensors = (directory / WEIGHTS_FILE).read_bytes()
    info = _header_info(safetensors)
    fallback = None if name or (info is not None and info.name) else directory.name
    return peft_from_bytes((directory / CONFIG_FILE).read_bytes(), safetensors, base, name or fallback)
