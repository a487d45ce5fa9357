"""Per-epoch evaluation: completion-only loss and exact-match accuracy of greedy generations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .data import Encoded, batch_order, collate


@dataclass
class EvalResult:
    """Eval loss (mean over completion tokens), accuracy (exact match after strip) and a few samples."""

    loss: float
    accuracy: float
    examples: int
    samples: list[tuple[str, str]] = field(default_factory=list)  # (expected, generated)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def eval_loss(model: nn.Module, items: Sequence[Encoded], batch_size: int, pad_id: int) -> float:
    """Token-weighted mean cross-entropy over completion tokens."""
    total, count = 0.0, 0
    for positions in batch_order(len(items), batch_size, seed=0, shuffle=False):
        batch = collate([items[p] for p in positions], pad_id, _device(model))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        keep = labels != -100
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total += float(-(picked * keep).sum())
        count += int(keep.sum())
    return total / max(count, 1)


@torch.no_grad()
def generate_completions(model: nn.Module, tokenizer: Any, items: Sequence[Encoded], batch_size: int,
                         extra_tokens: int = 4) -> list[str]:
    """Greedy completions of each prompt, left-padded in batches, decoded without special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(e.prompt_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, e in enumerate(chunk):
            ids[row, width - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
            mask[row, width - len(e.prompt_ids) :] = 1
        new = max(len(e.completion_ids) for e in chunk) + extra_tokens
        dev = _device(model)
        gen = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        out.extend(tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True))
    return out


def evaluate(model: nn.Module, tokenizer: Any, items: Sequence[Encoded], batch_size: int = 16,
             limit: int | None = 64, samples: int = 3) -> EvalResult:
    """Eval loss and exact-match accuracy on the first `limit` items; the model is left in eval mode."""
    items = list(items[:limit] if limit else items)
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss = eval_loss(model, items, batch_size, pad)
    texts = generate_completions(model, tokenizer, items, batch_size)
    hits = [t.strip() == e.completion.strip() for t, e in zip(texts, items, strict=True)]
    return EvalResult(loss, sum(hits) / max(len(items), 1), len(items),
                      [(e.completion, t) for e, t in zip(items[:samples], texts, strict=False)])
