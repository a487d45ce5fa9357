"""Calibration for the grad and snip masks: accumulate |dL/dW| over a few batches of the training data.

No optimizer step is taken and the weights do not change. Each target weight's gradient is folded into an
fp32 accumulator by a post-accumulate-grad hook and then dropped, so at most one dense gradient per weight
lives at a time besides the accumulators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import torch
from torch import nn

from ..errors import MaskError, UnknownLayerError
from ..masks import build_masks

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The HF causal-LM loss for a batch holding input_ids, attention_mask and labels."""
    return model(**batch, use_cache=False).loss


def collect_gradients(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    names: Sequence[str],
    num_batches: int | None = None,
    loss_fn: LossFn = causal_lm_loss,
) -> dict[str, torch.Tensor]:
    """Sums |grad| of each named weight over calibration batches, one backward per batch.

    Args:
        model: the base model; its weights, requires_grad flags and .grad fields are left as found.
        batches: calibration batches (dicts for `loss_fn`).
        names: weight names to collect for.
        num_batches: use at most this many batches; default all.
        loss_fn: (model, batch) -> scalar loss.

    Returns:
        name -> fp32 tensor of the weight's shape: sum over batches of |dL_b/dW|.
    """
    params = dict(model.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise UnknownLayerError(f"cannot calibrate unknown weight(s) {unknown[:3]}")
    acc = {n: torch.zeros(params[n].shape, dtype=torch.float32, device=params[n].device) for n in names}
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    hooks = []

    def fold(name: str):
        def hook(p: torch.Tensor) -> None:
            acc[name].add_(p.grad.abs().float())
            p.grad = None

        return hook

    was_training = model.training
    seen = 0
    try:
        for p in params.values():
            p.requires_grad_(False)
        for n in names:
            params[n].requires_grad_(True)
            params[n].grad = None
            hooks.append(params[n].register_post_accumulate_grad_hook(fold(n)))
        model.train()
        batch_iter = batches if num_batches is None else islice(batches, num_batches)
        for batch in batch_iter:
            loss_fn(model, batch).backward()
            seen += 1
    finally:
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = grads[n]
        model.train(was_training)
    if seen == 0:
        raise MaskError("calibration got no batches; the grad and snip masks need at least one")
    return acc


def masks_for(
    model: nn.Module,
    kind: str,
    density: float,
    names: Sequence[str],
    *,
    seed: int = 0,
    calibration: Iterable[Mapping[str, torch.Tensor]] | None = None,
    num_batches: int | None = None,
    exclude: Mapping[str, torch.Tensor] | None = None,
    loss_fn: LossFn = causal_lm_loss,
) -> dict[str, torch.Tensor]:
    """Builds masks of one kind, running calibration first when the kind needs gradients.

    Args:
        model: the base model.
        kind: struct, rand, wm, grad or snip.
        density: fraction of each weight to train.
        names: target weight names.
        seed: mask seed.
        calibration: batches for grad and snip.
        num_batches: calibration batches to use.
        exclude: name -> indices taken by earlier adapters.
        loss_fn: calibration loss.

    Returns:
        name -> sorted flat int64 indices.
    """
    params = dict(model.named_parameters())
    grads: dict[str, Any] | None = None
    if kind in ("grad", "snip"):
        if calibration is None:
            raise MaskError(f"the {kind} mask needs calibration batches of the training data")
        grads = collect_gradients(model, calibration, names, num_batches, loss_fn)
    weights = {n: params[n].detach() for n in names}
    return build_masks(weights, kind, density, seed=seed, grads=grads, exclude=exclude, names=names)
