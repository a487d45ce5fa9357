"""The paper's five masks. Each returns the sorted flat indices a SHiRA adapter may train.

Every mask function has one signature::

    mask_fn(weight, density, *, seed=0, exclude=None, grad=None) -> LongTensor of sorted flat indices

`exclude` holds flat indices taken by earlier adapters; they are never chosen again, which gives the paper's
non-overlapping "next top 1%" masks for multi-adapter fusion.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch

from .errors import MaskError

DEFAULT_DENSITY = 0.01
MaskFn = Callable[..., torch.Tensor]


def _count(weight: torch.Tensor, density: float) -> int:
    if not 0 < density <= 1:
        raise MaskError(f"density must be in (0, 1], got {density}")
    return max(1, round(density * weight.numel()))


def _blocked(numel: int, exclude: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    if exclude is None or exclude.numel() == 0:
        return None
    blocked = torch.zeros(numel, dtype=torch.bool, device=device)
    blocked[exclude.to(device=device, dtype=torch.int64)] = True
    return blocked


def _top_k(score: torch.Tensor, k: int, exclude: torch.Tensor | None) -> torch.Tensor:
    score = score.detach().reshape(-1).float().clone()
    blocked = _blocked(score.numel(), exclude, score.device)
    free = score.numel() - (int(blocked.sum()) if blocked is not None else 0)
    if free < k:
        raise MaskError(f"asked for {k:,} entries but only {free:,} of {score.numel():,} are not excluded")
    if blocked is not None:
        score[blocked] = -math.inf
    return torch.sort(torch.topk(score, k, sorted=False).indices).values


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def rand_mask(weight: torch.Tensor, density: float = DEFAULT_DENSITY, *, seed: int = 0,
              exclude: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Uniformly random entries (SHiRA-Rand)."""
    k = _count(weight, density)
    score = torch.rand(weight.numel(), generator=_generator(seed))
    return _top_k(score, k, None if exclude is None else exclude.cpu()).to(weight.device)


def wm_mask(weight: torch.Tensor, density: float = DEFAULT_DENSITY, *, seed: int = 0,
            exclude: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
    """The largest |W| entries (SHiRA-WM)."""
    return _top_k(weight.abs(), _count(weight, density), exclude)


def grad_mask(weight: torch.Tensor, density: float = DEFAULT_DENSITY, *, seed: int = 0,
              exclude: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
    """The largest accumulated |dL/dW| entries over calibration batches (SHiRA-Grad)."""
    if grad is None:
        raise MaskError("the grad mask needs accumulated gradients: pass grad= (see training.collect_gradients)")
    return _top_k(grad.abs(), _count(weight, density), exclude)


def snip_mask(weight: torch.Tensor, density: float = DEFAULT_DENSITY, *, seed: int = 0,
              exclude: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
    """The largest |W * dL/dW| entries, SNIP's connection sensitivity (SHiRA-SNIP)."""
    if grad is None:
        raise MaskError("the snip mask needs accumulated gradients: pass grad= (see training.collect_gradients)")
    return _top_k((weight.float() * grad.float()).abs(), _count(weight, density), exclude)


def struct_mask(weight: torch.Tensor, density: float = DEFAULT_DENSITY, *, seed: int = 0,
                exclude: torch.Tensor | None = None, grad: torch.Tensor | None = None) -> torch.Tensor:
    """Whole random rows plus the diagonal (SHiRA-Struct): structured, yet high rank thanks to the diagonal.

    Rows are chosen so that rows plus diagonal come to about `density` of the weight.
    """
    if weight.dim() != 2:
        raise MaskError(f"the struct mask needs a 2-D weight, got shape {list(weight.shape)}")
    k = _count(weight, density)
    rows, cols = weight.shape
    diag = min(rows, cols)
    n_rows = max(0, min(rows, round((k - diag) / max(cols - 1, 1))))
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    keep[torch.randperm(rows, generator=_generator(seed))[:n_rows]] = True
    keep[torch.arange(diag), torch.arange(diag)] = True
    blocked = _blocked(weight.numel(), exclude, torch.device("cpu"))
    flat = keep.reshape(-1)
    if blocked is not None:
        flat &= ~blocked
    if not bool(flat.any()):
        raise MaskError("the struct mask is empty after excluding earlier adapters' indices")
    return torch.nonzero(flat).reshape(-1).to(weight.device)


MASKS: dict[str, MaskFn] = {
    "struct": struct_mask,
    "rand": rand_mask,
    "wm": wm_mask,
    "grad": grad_mask,
    "snip": snip_mask,
}


def mask_fn(kind: str) -> MaskFn:
    """Looks up a mask function by name."""
    if kind not in MASKS:
        raise MaskError(f"unknown mask {kind!r}; use one of {', '.join(MASKS)}")
    return MASKS[kind]


def build_masks(
    weights: Mapping[str, torch.Tensor],
    kind: str,
    density: float = DEFAULT_DENSITY,
    *,
    seed: int = 0,
    grads: Mapping[str, torch.Tensor] | None = None,
    exclude: Mapping[str, torch.Tensor] | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Runs one mask kind over several weights.

    Args:
        weights: name -> weight tensor.
        kind: struct, rand, wm, grad or snip.
        density: fraction of each weight to train.
        seed: base seed; each weight gets seed + its position, so layers differ but runs repeat.
        grads: name -> accumulated gradient, for grad and snip.
        exclude: name -> flat indices used by earlier adapters.
        names: subset of `weights` to mask; default all.

    Returns:
        name -> sorted flat int64 indices.
    """
    fn = mask_fn(kind)
    out = {}
    for pos, name in enumerate(names or weights):
        grad = grads.get(name) if grads else None
        if kind in ("grad", "snip") and grad is None:
            raise MaskError(f"no accumulated gradient for layer {name}; the {kind} mask needs one per layer")
        ex = exclude.get(name) if exclude else None
        out[name] = fn(weights[name], density, seed=seed + pos, exclude=ex, grad=grad)
    return out
