"""Writing PEFT's SHiRA format (shira_core.peft_interop reads it; the layout is described there).

PEFT gives every layer exactly r * (in + out) entries with one r for the whole adapter, so the exporter picks the
smallest r that fits every layer and pads each layer with zero-valued entries at positions it does not touch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from .delta import SparseAdapter, SparseDelta
from .errors import AdapterFormatError, ShapeMismatchError
from .io import check_free_text
from .metadata import header_fields
from .peft_interop import CONFIG_FILE, INDEX_KEY, META_KEY, PREFIX, WEIGHT_KEY, WEIGHTS_FILE


def peft_rank(adapter: SparseAdapter) -> int:
    """The smallest PEFT r whose r*(in+out) entries per layer hold every layer of the adapter.

    Raises:
        ShapeMismatchError: a weight is not 2-D, or some layer cannot hold r*(in+out) entries.
    """
    r = 1
    for delta in adapter:
        if len(delta.shape) != 2:
            raise ShapeMismatchError(
                f"PEFT SHiRA adapts only 2-D nn.Linear weights; layer {delta.name} of adapter "
                f"{adapter.name!r} has shape {list(delta.shape)}"
            )
        r = max(r, math.ceil(delta.nnz / sum(delta.shape)))
    for delta in adapter:
        need = r * sum(delta.shape)
        if need > delta.numel:
            widest = max(adapter, key=lambda d: math.ceil(d.nnz / sum(d.shape)))
            raise ShapeMismatchError(
                f"PEFT cannot hold adapter {adapter.name!r}: it gives every layer r*(in+out) entries with "
                f"one r; layer {widest.name} ({widest.nnz:,} entries, shape {list(widest.shape)}) needs "
                f"r={r}, and then layer {delta.name} of shape {list(delta.shape)} would need {need:,} "
                f"entries but has only {delta.numel:,} elements; export those layers separately or use "
                "fewer entries"
            )
    return r


def _padded(delta: SparseDelta, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and values grown to `count` with zero values at the lowest untouched positions."""
    idx, vals = delta.indices.to(torch.int64).cpu(), delta.values.detach().cpu()
    pad = count - idx.numel()
    if pad == 0:
        return idx, vals
    free = torch.ones(delta.numel, dtype=torch.bool)
    free[idx] = False
    extra = torch.nonzero(free).reshape(-1)[:pad]
    return torch.cat([idx, extra]), torch.cat([vals, torch.zeros(pad, dtype=vals.dtype)])


def peft_to_bytes(adapter: SparseAdapter, base_model_name_or_path: str | None = None) -> tuple[bytes, bytes]:
    """Serialises an adapter to PEFT's SHiRA format.

    Args:
        adapter: the adapter; every layer must be the weight of an nn.Linear (PEFT adapts nothing else).
        base_model_name_or_path: recorded in the config for PEFT's convenience.

    Returns:
        (adapter_config.json bytes, adapter_model.safetensors bytes).
    """
    adapter.validate()
    check_free_text(adapter)
    if not len(adapter):
        raise AdapterFormatError(f"adapter {adapter.name!r} has no layers; PEFT needs a target module")
    r = peft_rank(adapter)
    tensors: dict[str, torch.Tensor] = {}
    modules, nnz = [], {}
    for delta in adapter:
        if not delta.name.endswith(".weight"):
            raise ShapeMismatchError(f"PEFT SHiRA adapts nn.Linear weights; {delta.name} is not a .weight")
        module = delta.name.removesuffix(".weight")
        idx, vals = _padded(delta, r * sum(delta.shape))
        in_f = delta.shape[1]
        pairs = torch.stack([idx // in_f, idx % in_f]).to(torch.int32)
        tensors[PREFIX + module + INDEX_KEY] = pairs.contiguous()
        tensors[PREFIX + module + WEIGHT_KEY] = vals.contiguous()
        modules.append(module)
        nnz[delta.name] = delta.nnz
    header = {**header_fields(adapter), "nnz": nnz}
    # Full module paths match exactly one module each (PEFT matches list entries by name or dotted suffix).
    config = {
        "base_model_name_or_path": base_model_name_or_path,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_weights": True,
        "mask_type": "random",
        "modules_to_save": None,
        "peft_type": "SHIRA",
        "r": r,
        "random_seed": None,
        "revision": None,
        "target_modules": sorted(modules),
        "task_type": None,
    }
    weights = st_save(tensors, metadata={"format": "pt", META_KEY: json.dumps(header)})
    return json.dumps(config, indent=2).encode(), weights


def save_peft_adapter(
    adapter: SparseAdapter, directory: str | os.PathLike[str], base_model_name_or_path: str | None = None
) -> Path:
    """Writes the adapter as a PEFT SHiRA directory (created if missing) that PeftModel.from_pretrained loads.

    Returns:
        The directory.
    """
    config, weights = peft_to_bytes(adapter, base_model_name_or_path)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for file, data in ((WEIGHTS_FILE, weights), (CONFIG_FILE, config)):
        tmp = directory / (file + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, directory / file)
    return directory
