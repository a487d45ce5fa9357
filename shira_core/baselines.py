"""The LoRA baseline that `shira experiment` holds SHiRA against: PEFT LoRA trained at SHiRA's parameter count
with SHiRA's recipe, kept as factors, and applied as a dense W0 + ΔW.

lora_ranks picks each layer's rank r so that r * (in + out) is closest to SHiRA's density * in * out; train_lora
trains with train_adapter's recipe (training.loop.train_epochs: seed, data order, AdamW without weight decay,
gradient clipping), so both methods see the same batches in the same order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .training.data import Example, encode_all
from .training.loop import TrainConfig, train_epochs


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
        model, tokenizer: the base and its tokenizer.
        train: training examples.
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
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        device = next(model.parameters()).device
        train_epochs(model, params, encode_all(tokenizer, train, cfg.max_len), cfg, pad=pad, device=device,
                     call=peft_model, progress=progress)
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
