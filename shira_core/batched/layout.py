"""Which Linear layers the row corrections bind to, and where their weights sit in the Switcher's buffers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..switcher import Switcher


@dataclass
class LinearLayer:
    name: str  # the weight's parameter name
    out_features: int
    in_features: int


class LinearLayout:
    """The model's Linear-only weights as layer ids, and a map from flat-buffer positions back to them.

    A weight that is not used only as an nn.Linear weight (a tied embedding, a norm) gets no layer id: a set that
    changes one cannot share a batch, since no Linear's wrapper could correct it.

    Args:
        model: the model the Switcher is bound to.
        switcher: its Switcher (public `weights`: each bound weight's buffer, offset and shape).
    """

    def __init__(self, model: nn.Module, switcher: Switcher) -> None:
        users: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for pname, param in module.named_parameters(recurse=False):
                users.setdefault(id(param), []).append((module, pname))
        self.layers: list[LinearLayer] = []
        self.targets: list[tuple[nn.Module, int]] = []  # (Linear, layer id) to wrap while plans are in use
        self.offsets: dict[str, int] = {}
        spans: dict[int, list[tuple[int, int, str]]] = {}
        for weight in switcher.weights:
            owners = users.get(id(weight.param), [])
            linear = bool(owners) and all(isinstance(m, nn.Linear) and p == "weight" for m, p in owners)
            lid = -1
            if linear and len(weight.shape) == 2:
                lid = len(self.layers)
                self.layers.append(LinearLayer(weight.name, weight.shape[0], weight.shape[1]))
                self.targets += [(module, lid) for module, _ in owners]
            spans.setdefault(weight.group, []).append((weight.offset, lid, weight.name))
            self.offsets[weight.name] = weight.offset
        # Per flat buffer: sorted start offsets, and the layer id (or -1) and name of the weight at each.
        self.spans: dict[int, tuple[torch.Tensor, list[int], list[str]]] = {}
        for gid, items in spans.items():
            items.sort()
            self.spans[gid] = (torch.tensor([s[0] for s in items], dtype=torch.int64), [s[1] for s in items],
                               [s[2] for s in items])
        params = [w.param for w in switcher.weights]
        self.device = params[0].device if params else torch.device("cpu")
        self.weight_dtype = params[0].dtype if params else torch.float32
