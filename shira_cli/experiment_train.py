"""Training helpers for `shira experiment`: SHiRA on given masks, and PEFT LoRA at SHiRA's parameter count.

train_adapter picks its own mask, so the non-overlapping ("next top 1%") adapters, whose masks exclude the
indices of earlier tasks, and the LoRA baselines use `train_masked` and `train_lora` here. Both follow
train_adapter's recipe step for step (seed, data order, AdamW without weight decay, gradient clipping), so
the three methods see the same batches in the same order; a test checks train_masked against train_adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shira_core.delta import SparseAdapter
from shira_core.fingerprint import BaseFingerprint
from shira_core.training import TrainConfig, attach_sparse_params, encode_all, iter_batches
from shira_core.training.data import Example


def _steps(model: nn.Module, tokenizer: Any, train: Sequence[Example], cfg: TrainConfig,
           params: list[torch.Tensor], call: Callable[..., Any], progress: bool) -> int:
    """train_adapter's inner loop: epochs of seeded batches, stop at cfg.max_steps. Returns the steps run."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    items = encode_all(tokenizer, train, cfg.max_len)
    total = -(-len(items) // cfg.batch_size) * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    step = 0
    with tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True) as bar:
        for epoch in range(1, cfg.epochs + 1):
            model.train()  # a PEFT wrapper shares these modules, LoRA layers included
            for batch in iter_batches(items, cfg.batch_size, cfg.seed + epoch, pad, device):
                if step >= total:
                    return step
                loss = call(**batch, use_cache=False).loss
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                bar.update(1)
    return step


def train_masked(model: nn.Module, tokenizer: Any, train: Sequence[Example], cfg: TrainConfig,
                 masks: Mapping[str, torch.Tensor], name: str, *, progress: bool = False) -> SparseAdapter:
    """Trains SHiRA values at the given masks (sparse parameters); the model ends as it started.

    Args:
        model, tokenizer: the base and its tokenizer.
        train: training examples.
        cfg: the same TrainConfig train_adapter would get (method must be "sparse"; mask is only recorded).
        masks: weight name -> sorted flat indices, e.g. from masks_for(..., exclude=...).
        name: adapter name.

    Returns:
        The SparseAdapter, fingerprinted against the untouched base.
    """
    torch.manual_seed(cfg.seed)
    fingerprint = BaseFingerprint.of(model).to_dict(list(masks))
    handle = attach_sparse_params(model, masks)
    started = time.perf_counter()
    try:
        steps = _steps(model, tokenizer, train, cfg, list(handle.parameters()), model, progress)
        extra = {"density": f"{cfg.density:g}", "method": "sparse", "lr": f"{cfg.lr:g}", "seed": str(cfg.seed),
                 "steps": str(steps), "seconds": f"{time.perf_counter() - started:.1f}"}
        return handle.extract(name, cfg.mask, base_fingerprint=fingerprint, extra=extra)
    finally:
        handle.remove()
        model.eval()


def lora_ranks(model: nn.Module, names: Sequence[str], density: float) -> dict[str, int]:
    """Per weight, the LoRA rank r with r * (in + out) closest to SHiRA's density * in * out (at least 1)."""
    params = dict(model.named_parameters())
    ranks = {}
    for name in names:
        out_f, in_f = params[name].shape
        ranks[name] = max(1, round(density * out_f * in_f / (out_f + in_f)))
    return ranks


@dataclass
class LoraFactors:
    """A trained LoRA adapter as factors: ΔW = scaling * B @ A for each target weight name."""

    name: str
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # weight name -> (A (r, in), B (out, r), scaling)

    @property
    def params(self) -> int:
        return sum(a.numel() + b.numel() for a, b, _ in self.factors.values())

    def delta(self, weight: str) -> torch.Tensor:
        a, b, scaling = self.factors[weight]
        return (b.float() @ a.float()) * scaling

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors, meta = {}, {"name": self.name}
        for weight, (a, b, s) in self.factors.items():
            tensors[f"{weight}.lora_A"], tensors[f"{weight}.lora_B"] = a.contiguous(), b.contiguous()
            meta[weight] = repr(s)
        return tensors, meta

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> LoraFactors:
        weights = [k[: -len(".lora_A")] for k in tensors if k.endswith(".lora_A")]
        return cls(meta["name"], {w: (tensors[f"{w}.lora_A"], tensors[f"{w}.lora_B"], float(meta[w]))
                                  for w in weights})


def train_lora(model: nn.Module, tokenizer: Any, train: Sequence[Example], cfg: TrainConfig, names: Sequence[str],
               name: str, *, alpha_ratio: float = 2.0, progress: bool = False) -> LoraFactors:
    """Trains PEFT LoRA on the named weights with ranks from lora_ranks(cfg.density); the model is unwrapped after.

    Args:
        model, tokenizer, train: as train_masked.
        cfg: TrainConfig; lr, steps, batches and seed as for SHiRA; density sets the ranks.
        names: target weight names (``<module>.weight`` of nn.Linear modules).
        name: adapter name.
        alpha_ratio: lora_alpha = alpha_ratio * r, so the scaling alpha / r is the same for every layer.

    Returns:
        The trained factors on CPU.
    """
    from peft import LoraConfig, get_peft_model

    ranks = lora_ranks(model, names, cfg.density)
    modules = {n.rsplit(".", 1)[0]: r for n, r in ranks.items()}
    pattern = {re.escape(m): r for m, r in modules.items()}
    config = LoraConfig(r=max(modules.values()), lora_alpha=alpha_ratio * max(modules.values()), lora_dropout=0.0,
                        target_modules=list(modules), rank_pattern=pattern,
                        alpha_pattern={k: alpha_ratio * r for k, r in pattern.items()})
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(cfg.seed)  # LoRA A's init, then the same seed state as train_adapter for the steps
    peft_model = get_peft_model(model, config)
    torch.manual_seed(cfg.seed)
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        _steps(model, tokenizer, train, cfg, params, peft_model, progress)
        found = {}
        for module_name, module in peft_model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                key = next(m for m in modules if module_name == m or module_name.endswith("." + m))
                found[key + ".weight"] = (module.lora_A["default"].weight.detach().cpu().clone(),
                                          module.lora_B["default"].weight.detach().cpu().clone(),
                                          float(module.scaling["default"]))
    finally:
        peft_model.unload()
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.eval()
    missing = [n for n in names if n not in found]
    if missing:
        raise RuntimeError(f"LoRA adapter {name!r} has no factors for {len(missing)} layer(s), e.g. {missing[0]}")
    return LoraFactors(name, found)


@contextmanager
def dense_deltas_applied(model: nn.Module, items: Sequence[tuple[LoraFactors, float]]) -> Iterator[None]:
    """W0 + Σ w_k ΔW_k on every weight the adapters touch, in fp32, for the duration of the block; the saved
    originals are copied back afterwards, so the base returns bit for bit."""
    params = dict(model.named_parameters())
    weights = list(dict.fromkeys(w for lora, _ in items for w in lora.factors))
    saved = {}
    try:
        with torch.no_grad():
            for w in weights:
                p = params[w]
                saved[w] = p.detach().clone()
                total = sum(lora.delta(w) * float(alpha) for lora, alpha in items if w in lora.factors)
                p.copy_((p.float() + total.to(p.device)).to(p.dtype))
        yield
    finally:
        with torch.no_grad():
            for w, original in saved.items():
                params[w].copy_(original)


def dense_orthogonality(a: LoraFactors, b: LoraFactors) -> dict[str, Any]:
    """AWOM and AWOR of two LoRA adapters' ΔW over their common layers, with analysis.awom_awor's aggregates.

    ΔW1ᵀΔW2 = s1 s2 A1ᵀ (B1ᵀ B2) A2 is computed densely in float64; ||·||_0 counts its non-zero entries.
    """
    rows = []
    for w in a.factors:
        if w not in b.factors:
            continue
        a1, b1, s1 = (t.double() if isinstance(t, torch.Tensor) else t for t in a.factors[w])
        a2, b2, s2 = (t.double() if isinstance(t, torch.Tensor) else t for t in b.factors[w])
        product = (a1.T @ (b1.T @ b2) @ a2) * (s1 * s2)
        m = product.shape[0]
        nnz = int((product != 0).sum())
        rows.append({"awom": float(torch.linalg.vector_norm(product)), "awor": 1.0 - nnz / (m * m),
                     "product_nnz": nnz, "product_numel": m * m})
    n = len(rows)
    return {
        "common_layers": n,
        "awom_mean": sum(r["awom"] for r in rows) / n if n else None,
        "awom_total": math.sqrt(sum(r["awom"] ** 2 for r in rows)) if n else None,
        "awor_mean": sum(r["awor"] for r in rows) / n if n else None,
        "awor_pooled": 1.0 - sum(r["product_nnz"] for r in rows) / sum(r["product_numel"] for r in rows) if n else None,
        "overlap_fraction_a": 1.0 if n else 0.0,  # a fused LoRA ΔW is dense: every entry of every layer changes
    }


class AdapterCache:
    """Trained adapters on disk, one file per (task, kind, settings hash)."""

    def __init__(self, folder: Path | None, reuse: bool, model: nn.Module, label: str) -> None:
        from shira_core.fingerprint import BaseFingerprint

        self.folder, self.reuse, self.label = folder, reuse, label
        self.fingerprint = BaseFingerprint.of(model)

    def path(self, task: str, kind: str, settings: dict[str, Any]) -> Path | None:
        if self.folder is None:
            return None
        key = hashlib.sha1(json.dumps({"model": self.label, **settings}, sort_keys=True).encode()).hexdigest()[:12]
        return self.folder / f"{task}-{kind}-{key}.safetensors"

    def load(self, path: Path | None, kind: str) -> Any:
        if path is None or not self.reuse or not path.is_file():
            return None
        if kind == "lora":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return LoraFactors.from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata())  # noqa: SIM118
        from shira_core.io import load_adapter

        return load_adapter(path, base=self.fingerprint)

    def save(self, path: Path | None, adapter: Any) -> None:
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if hasattr(adapter, "factors"):
            from safetensors.torch import save_file

            tensors, meta = adapter.to_tensors()
            save_file(tensors, str(path), metadata=meta)
        else:
            from shira_core.io import save_adapter

            save_adapter(adapter, path)
