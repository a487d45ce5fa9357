"""SHiRA through gradient masking: any training loop, HF Trainer included, becomes SHiRA fine-tuning.

A post-accumulate-grad hook on each target weight keeps its gradient only at the mask's indices, so the
optimizer moves nothing else. Every other parameter is frozen. One caveat: decoupled weight decay (AdamW)
shrinks every parameter that has a gradient, masked entries or not. Build the optimizer from
``handle.param_groups()`` or call ``handle.disable_weight_decay(optimizer)``; both set weight_decay=0 on the
target weights (the paper trains SHiRA without it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..delta import SparseAdapter, SparseDelta
from ..errors import MaskError, UnknownLayerError


def _targets(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    unknown = [n for n in masks if n not in params]
    if unknown:
        raise UnknownLayerError(f"the mask names weight(s) the model does not have: {unknown[:3]}")
    for name, idx in masks.items():
        numel = params[name].numel()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= numel):
            raise MaskError(
                f"mask for layer {name} holds indices in [{int(idx.min()):,}, {int(idx.max()):,}] "
                f"but the weight has {numel:,} elements"
            )
    return {n: params[n] for n in masks}


class GradientMaskHandle:
    """What attach_gradient_masks installed; remove() undoes it (hooks off, requires_grad flags restored).

    Attributes:
        masks: name -> flat int64 indices on the weight's device.
        base_values: name -> the weight's values at those indices when attached (nnz each, for extraction).
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        self.model = model
        self.params = _targets(model, masks)
        self.masks = {n: masks[n].to(device=p.device, dtype=torch.int64) for n, p in self.params.items()}
        self.base_values = {n: p.detach().reshape(-1)[self.masks[n]].clone() for n, p in self.params.items()}
        self._flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self._hooks: list[Any] = []
        for p in model.parameters():
            p.requires_grad_(False)
        for name, p in self.params.items():
            p.requires_grad_(True)
            self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(self.masks[name])))

    @staticmethod
    def _hook(idx: torch.Tensor):
        def keep_masked(param: torch.Tensor) -> None:
            # Gather the masked entries, zero the rest, scatter back: no dense mask tensor is kept.
            flat = param.grad.view(-1)
            kept = flat.index_select(0, idx)
            flat.zero_()
            flat.index_copy_(0, idx, kept)

        return keep_masked

    def parameters(self) -> list[nn.Parameter]:
        return list(self.params.values())

    def param_groups(self, **options: Any) -> list[dict[str, Any]]:
        """One optimizer param group over the target weights, with weight_decay forced to 0."""
        return [{"params": self.parameters(), **options, "weight_decay": 0.0}]

    def disable_weight_decay(self, optimizer: torch.optim.Optimizer) -> None:
        """Sets weight_decay=0 on every optimizer group holding a target weight (e.g. one HF Trainer built)."""
        ids = {id(p) for p in self.params.values()}
        for group in optimizer.param_groups:
            if any(id(p) in ids for p in group["params"]) and "weight_decay" in group:
                group["weight_decay"] = 0.0

    def extract(self, name: str, mask_kind: str = "unknown", **meta: Any) -> SparseAdapter:
        """The trained deltas as a SparseAdapter; see extract_adapter."""
        return extract_adapter(self.model, self.base_values, self.masks, name, mask_kind, **meta)

    @torch.no_grad()
    def restore_base(self) -> None:
        """Writes the saved base values back at the mask indices; with masked training that is the whole base."""
        for name, p in self.params.items():
            p.view(-1).index_copy_(0, self.masks[name], self.base_values[name])

    def remove(self) -> None:
        """Removes the hooks and restores requires_grad flags; the trained weights stay (see restore_base)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._flags.get(n, p.requires_grad))
            if n in self.params:
                p.grad = None


def attach_gradient_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> GradientMaskHandle:
    """Makes any training loop train only the masked entries of the masked weights.

    Args:
        model: the model to fine-tune in place.
        masks: weight name -> flat indices (e.g. from shira_core.masks.build_masks).

    Returns:
        A handle with the saved base values, param_groups() for the optimizer, extract() and remove().
    """
    return GradientMaskHandle(model, masks)


def extract_adapter(
    model: nn.Module,
    base_values: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    name: str,
    mask_kind: str = "unknown",
    *,
    base_fingerprint: dict[str, Any] | None = None,
    description: str = "",
    extra: dict[str, str] | None = None,
) -> SparseAdapter:
    """Builds the adapter W[idx] - W0[idx] from a model trained in place (on CPU, in the weights' dtype).

    Args:
        model: the trained model.
        base_values: name -> W0 at the mask indices, saved before training.
        masks: name -> flat indices.
        name, mask_kind, base_fingerprint, description, extra: adapter metadata.
    """
    params = dict(model.named_parameters())
    deltas = {}
    for layer, idx in masks.items():
        p = params[layer]
        idx = idx.to(device=p.device, dtype=torch.int64)
        order = torch.argsort(idx)
        values = p.detach().reshape(-1)[idx] - base_values[layer].to(p.device)
        deltas[layer] = SparseDelta(layer, tuple(p.shape), idx[order].cpu(), values[order].cpu())
    return SparseAdapter(name, deltas, mask_kind, base_fingerprint, description, dict(extra or {}))
