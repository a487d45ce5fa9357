"""SHiRA as sparse parameters: only the nnz values are trainable, the base weights stay frozen.

Each target nn.Linear gets a forward that writes W0[idx] + values into its weight in place (an nnz-sized
scatter, as the Switcher does), then runs F.linear through a custom autograd function. Its backward gives
grad_input = g @ W and grad_values = (g^T x)[idx], and no gradient for W. So there is no dense gradient, no
dense optimizer state and no W0 + dW copy kept for backward.

grad_values is a sampled dense-dense product (SDDMM): torch.sparse.sampled_addmm computes g^T x only at the
mask, about density times the work of the dense product (13x faster than dense-then-gather at 1% on CPU).
Where it is unsupported (a dtype or device), the dense product is used and then gathered.
remove() writes the saved W0 values back, bit for bit, and restores every module's forward.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..delta import SparseAdapter, SparseDelta
from ..errors import MaskError, UnknownLayerError

GRAD_METHODS = ("sddmm", "dense")


class _Pattern:
    """The mask of one layer as a CSR pattern, for sampled_addmm; sorted flat indices are CSR order."""

    def __init__(self, idx: torch.Tensor, shape: tuple[int, int], method: str) -> None:
        self.idx, self.shape, self.method = idx, shape, method
        rows, cols = idx // shape[1], idx % shape[1]
        self.crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=idx.device)
        self.crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
        self.cols = cols
        self._csr: dict[torch.dtype, torch.Tensor] = {}

    def csr(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._csr:
            zeros = torch.zeros(self.idx.numel(), dtype=dtype, device=self.idx.device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "CSR support is in beta" and invariant-check notices
                self._csr[dtype] = torch.sparse_csr_tensor(self.crow, self.cols, zeros, self.shape)
        return self._csr[dtype]

    def sampled(self, g2: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """(g2^T x2) at the mask, in sorted-index order."""
        if self.method == "sddmm":
            try:
                gt = g2.t().contiguous()
                return torch.sparse.sampled_addmm(self.csr(gt.dtype), gt, x2.contiguous(), beta=0.0).values()
            except (RuntimeError, NotImplementedError):
                self.method = "dense"  # e.g. a half dtype without a kernel here; dense then gather works anywhere
        return (g2.t() @ x2).reshape(-1).index_select(0, self.idx)


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x W^T + b where W already holds W0 + scatter(values); gradients flow to x and values only."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None, pattern: _Pattern, base: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            weight.view(-1).index_copy_(0, pattern.idx, (base + values).to(weight.dtype))
        ctx.save_for_backward(x)
        # Kept as attributes, not saved tensors: W is rewritten in place by the next forward, after backward.
        ctx.weight, ctx.pattern, ctx.values_dtype = weight, pattern, values.dtype
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
            grad_values = ctx.pattern.sampled(g2, x2).to(ctx.values_dtype)
        return grad_x, grad_values, None, None, None, None


class _Layer:
    def __init__(self, module: nn.Linear, idx: torch.Tensor, values: nn.Parameter, method: str) -> None:
        self.module = module
        self.idx = idx
        self.values = values
        self.pattern = _Pattern(idx, tuple(module.weight.shape), method)
        self.base = module.weight.detach().reshape(-1)[idx].clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        return _SparseDeltaLinear.apply(x, self.values, m.weight, m.bias, self.pattern, self.base)


class SparseParams(nn.Module):
    """The trainable SHiRA values of a model, one nn.Parameter (nnz,) per target weight.

    Args:
        model: the model; target modules must be nn.Linear. It is changed in place until remove().
        masks: weight name (``<module>.weight``) -> flat indices.
        dtype: dtype of the trainable values; default float32 (a master copy even when the base is bf16).
        grad_method: "sddmm" (sampled product, falls back to dense where unsupported) or "dense".
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 grad_method: str = "sddmm") -> None:
        super().__init__()
        if grad_method not in GRAD_METHODS:
            raise ValueError(f"unknown grad_method {grad_method!r}; use one of {', '.join(GRAD_METHODS)}")
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
            idx = torch.sort(idx.to(device=w.device, dtype=torch.int64)).values
            if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
                raise MaskError(f"mask for layer {name} repeats an index")
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w.numel()):
                raise MaskError(f"mask for layer {name} holds indices outside its {w.numel():,} elements")
            param = nn.Parameter(torch.zeros(idx.numel(), dtype=dtype, device=w.device))
            self.values.append(param)
            self._layers[name] = _Layer(module, idx, param, grad_method)
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
            values = layer.values.detach().to(values_dtype or w.dtype).cpu()
            deltas[layer_name] = SparseDelta(layer_name, tuple(w.shape), layer.idx.cpu(), values)
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


def attach_sparse_params(model: nn.Module, masks: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                         grad_method: str = "sddmm") -> SparseParams:
    """Freezes the model and returns the trainable values; give ``.parameters()`` to the optimizer.

    Args:
        model: the base model, changed in place until ``remove()``.
        masks: weight name -> flat indices.
        dtype: dtype of the trainable values.
        grad_method: "sddmm" or "dense", see the module docstring.

    Returns:
        The SparseParams module; ``extract()`` gives the SparseAdapter, ``remove()`` restores the base exactly.
    """
    return SparseParams(model, masks, dtype, grad_method)
