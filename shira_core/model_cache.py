"""A converted-model cache: a GGUF base loads once through transformers' dequantisation, later from safetensors.

transformers parses and dequantises a GGUF file on every load (SmolLM2-135M Q4_1: ~12 s for the model and ~3 s
for the tokenizer on a 2-core CPU); the same weights saved with save_pretrained load in ~1.6 s. The first load
writes that copy, model and tokenizer, under the cache directory; later loads read it.

A copy's key is the source file's identity (resolved path, size, modification time), the dtype and the
transformers version, so a changed file, another dtype or a transformers upgrade never loads a stale copy. A
copy is written to a temporary directory and renamed into place, so a crash or a second process converting at
the same time never leaves a half-written copy where a loader looks.
"""

from __future__ import annotations

import copy as copying
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model

log = logging.getLogger(__name__)

MARKER = "shira-converted.json"  # written last: a directory without it is not a finished copy


def cache_key(source_file: Path, dtype: torch.dtype) -> dict[str, Any]:
    """What a converted copy depends on."""
    import transformers

    stat = source_file.stat()
    return {
        "source": str(source_file.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "dtype": str(dtype).removeprefix("torch."),
        "transformers": transformers.__version__,
    }


def cached_copy(cache_dir: Path, source_file: Path, dtype: torch.dtype) -> Path:
    """Where the converted copy of `source_file` in `dtype` lives (it may not exist yet)."""
    key = cache_key(source_file, dtype)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{source_file.stem}-{key['dtype']}-{digest}"


def is_complete(copy: Path) -> bool:
    return (copy / MARKER).is_file()


def write_copy(copy: Path, model: Any, tokenizer: Any, key: dict[str, Any]) -> bool:
    """Saves model and tokenizer as `copy`, atomically. Returns False (and logs why) when it cannot: a cache that
    cannot be written only costs the next start the conversion again."""
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=copy.name + ".tmp-", dir=copy.parent))
    except OSError as e:
        log.warning("converted-model cache %s is not writable (%s); the next start converts again", copy.parent, e)
        return False
    try:
        _save_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(key, indent=2))
        # mkdtemp's 0700 and safetensors' 0600 would hide the copy from a server run as another user (an image's).
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)
        os.replace(tmp, copy)  # a directory rename: atomic, and it fails if another process got there first
        return True
    except OSError as e:
        if not is_complete(copy):
            log.warning("could not write the converted-model cache %s (%s)", copy, e)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_model(model: Any, directory: Path) -> None:
    """config.json, generation_config.json and model.safetensors. Not save_pretrained: a model dequantised from
    GGUF keeps its quantizer, which refuses to save, although its weights are plain tensors by then."""
    config = copying.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    save_model(model, str(directory / "model.safetensors"))  # writes a tied weight once
