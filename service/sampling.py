"""Choosing each row's next token from its logits: greedy, or sampled with temperature and top_p."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import torch

from .types import SamplingParams

# Temperatures are floored here so that scaling by 1/T stays finite in fp32 (the API refuses T below
# service.protocol's MIN_TEMPERATURE anyway; this guards direct callers).
TEMPERATURE_FLOOR = 1e-4


class Sampled(Protocol):
    """What sampling reads of a row (service.batch_generation.Row)."""

    params: SamplingParams
    generator: torch.Generator | None  # None: greedy


def sample(logits: torch.Tensor, rows: Sequence[Sampled]) -> torch.Tensor:
    """The next token of each row: greedy rows take the argmax, sampled rows draw from softmax(logits / T) cut to
    top_p. Never raises on extreme settings: T is floored, the most likely token always survives the top_p cut,
    and a row whose distribution is unusable (NaN or infinite logits) keeps its argmax."""
    picked = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(rows) if r.generator is not None]
    if not sampled:
        return picked
    index = torch.tensor(sampled, device=logits.device)
    temps = [_temperature(rows[i].params.temperature) for i in sampled]
    scaled = logits.index_select(0, index).float() / torch.tensor(temps, device=logits.device)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    top_p = [rows[i].params.top_p for i in sampled]
    if any(p < 1.0 for p in top_p):
        ordered, order = probs.sort(dim=-1, descending=True)
        cut = (ordered.cumsum(-1) - ordered) >= torch.tensor(top_p, device=logits.device)[:, None]
        cut[:, 0] = False  # a top_p that underflows fp32 would otherwise cut every token
        probs = torch.zeros_like(probs).scatter_(-1, order, ordered.masked_fill(cut, 0.0))
    usable = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
    for j, i in enumerate(sampled):
        if usable[j]:
            picked[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
    return picked


def _temperature(value: float) -> float:
    return value if math.isfinite(value) and value > TEMPERATURE_FLOOR else TEMPERATURE_FLOOR
