"""SHiRA as sparse parameters: only the nnz values are trainable, the base weights stay frozen.

Each target nn.Linear gets a forward that writes W0[idx] + values into its weight in place (an nnz-sized
scatter, as the Switcher does), then runs F.linear through a custom autograd function. Its backward gives
grad_input = g @ W and grad_values = (g^T x)[idx], and no gradient for W. So there is no dense gradient, no
dense optimizer state and no W0 + dW copy kept for backward; the only dense transient is g^T x of one layer.
remove() writes the saved W0 values back, bit for bit, and restores every module's forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..delta import SparseAdapter, SparseDelta
from ..errors import MaskError, UnknownLayerError


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x W^T + b where W already holds W0 + scatter(values); gradients flow to x and values only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, idx: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight.view(-1).index_copy_(0, idx, (base + values).to(weight.dtype))
        ctx.save_for_backward(x)
        # Kept as attributes, not saved tensors: W is rewritten in place by the next forward, after backward.
        ctx.weight, ctx.idx, ctx.values_dtype = weight, idx, values.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            x2 = x.reshape(-1, x.shape[-1]).to(g2.dtype)
            grad_values = (g2.t() @ x2).view(-1).index_select(0, ctx.idx).to(ctx.values_dtype)
        return grad_x, grad_values, None, None, None, None


class _Layer:
    def __init__(self, module: nn.Linear, idx: torch.Tensor, values: nn.Parameter) -> None:
        self.module = module
        self.idx = idx
        self.values = values
        self.base = module.weight.detach().reshape(-1)[idx].clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return _SparseDeltaLinear.apply(x, self.values, m.weight, m.bias, self.idx, self.base)


class SparseParams(nn.Module):
    """The trainable SHiRA values of a model, one nn.Parameter (nnz,) per target weight.

    Args:
        model: the model; target modules must be nn.Linear. It is changed in place until remove().
        masks: weight name (``<module>.weight``) -> flat indices.
        dtype: dtype of the trainable values; default float32 (a master copy even when the base is bf16).
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        self.model = [model]  # a list, so the base model is not registered as a submodule
        self.names = list(masks)
        self._layers: dict[str, _Layer] = {}
        self._flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.values = nn.ParameterList()
        for name, idx in masks.items():
            module_name, _, leaf = name.rpartition(".")
            module = modules.get(module_name)
            if leaf != "weight" or not isinstance(module, nn.Linear):
                raise UnknownLayerError(f"sparse-parameter training needs nn.Linear weights; {name} is not one")
            w = module.weight
            idx = idx.to(device=w.device, dtype=torch.int64)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w.numel()):
                raise MaskError(f"mask for layer {name} holds indices outside its {w.numel():,} elements")
            param = nn.Parameter(torch.zeros(idx.numel(), dtype=dtype, device=w.device))
            self.values.append(param)
            self._layers[name] = _Layer(module, idx, param)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in self._layers.values():
            layer.module.forward = layer.forward  # instance attribute: names and state_dict keys stay the same
        self._attached = True

    @property
    def nnz(self) -> int:
        return sum(v.numel() for v in self.values)

    def grads(self) -> dict[str, torch.Tensor | None]:
        return {n: layer.values.grad for n, layer in self._layers.items()}

    def extract(self, name: str, mask_kind: str = "unknown", *, base_fingerprint: dict[str, Any] | None = None,
                description: str = "", extra: dict[str, str] | None = None,
                values_dtype: torch.dtype | None = None) -> SparseAdapter:
        """The trained values as a SparseAdapter on CPU (values in `values_dtype`, default the weight's dtype)."""
        deltas = {}
        for layer_name, layer in self._layers.items():
            w = layer.module.weight
            order = torch.argsort(layer.idx)
            values = layer.values.detach()[order].to(values_dtype or w.dtype).cpu()
            deltas[layer_name] = SparseDelta(layer_name, tuple(w.shape), layer.idx[order].cpu(), values)
        return SparseAdapter(name, deltas, mask_kind, base_fingerprint, description, dict(extra or {}))

    @torch.no_grad()
    def remove(self) -> None:
        """Writes W0 back at every index, restores forward methods and requires_grad flags."""
        if not self._attached:
            return
        for layer in self._layers.values():
            layer.module.weight.view(-1).index_copy_(0, layer.idx, layer.base)
            del layer.module.forward
        for n, p in self.model[0].named_parameters():
            p.requires_grad_(self._flags.get(n, p.requires_grad))
        self._attached = False


def attach_sparse_params(model: nn.Module, masks: Mapping[str, torch.Tensor],
                         dtype: torch.dtype = torch.float32) -> SparseParams:
    """Freezes the model and returns the trainable values; give ``.parameters()`` to the optimizer.

    Args:
        model: the base model, changed in place until ``remove()``.
        masks: weight name -> flat indices.
        dtype: dtype of the trainable values.

    Returns:
        The SparseParams module; ``extract()`` gives the SparseAdapter, ``remove()`` restores the base exactly.
    """
    return SparseParams(model, masks, dtype)
