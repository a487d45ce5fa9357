"""Which parameters of a model an adapter may change: one definition, used by the Switcher and the fingerprint.

A weight is adaptable when it is floating point with 2 or more dimensions (the matrices of linear, embedding
and convolution layers). Norm scales and biases are not: they are 1-D, small, and SHiRA leaves them frozen.
Tied parameters (lm_head.weight sharing model.embed_tokens.weight) are one Parameter under two names; they
are listed once, under their first name, and the other names are aliases.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTABLE_RULE = "only floating-point weights with 2 or more dimensions can be switched"


def unique_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters with tied ones listed once, under their first name."""
    seen: set[int] = set()
    out: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        out[name] = param
    return out


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """Each other name of a tied parameter -> the first name it is listed under."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out


def adaptable(param: torch.Tensor) -> bool:
    """True for a floating-point tensor with 2 or more dimensions."""
    return param.dtype.is_floating_point and param.dim() >= 2


def adaptable_names(model: nn.Module) -> list[str]:
    """The first names of the model's adaptable parameters, in model order (aliases left out)."""
    return [name for name, param in unique_parameters(model).items() if adaptable(param)]
