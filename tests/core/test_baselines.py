"""The LoRA baseline: trained at SHiRA's parameter count with its recipe, applied densely, restored bit for bit."""

from __future__ import annotations

import pytest
import torch

from shira_core.baselines import LoraFactors, dense_deltas_applied, lora_ranks, train_lora
from shira_core.models import linear_weight_names
from shira_core.training import TrainConfig

from .training_support import char_tokenizer, demo_examples, demo_llama


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_lora_fused_densely_and_restored_bit_for_bit(tok):
    model = demo_llama()
    names = linear_weight_names(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    cfg = TrainConfig(method="sparse", density=0.1, lr=1e-2, batch_size=4, max_len=64, max_steps=3)
    a = train_lora(model, tok, demo_examples("sentiment"), cfg, names, "a")
    b = train_lora(model, tok, demo_examples("capitals"), cfg, names, "b")
    assert type(model).__name__ == "LlamaForCausalLM" and not any("lora" in n for n, _ in model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]) and p.requires_grad == flags[n], n
    ranks = lora_ranks(model, names, 0.1)
    assert {w: f[0].shape[0] for w, f in a.factors.items()} == ranks
    assert all(float(f[1].abs().sum()) > 0 for f in a.factors.values())  # B moved off its zero init
    params = dict(model.named_parameters())
    w = names[0]
    with dense_deltas_applied(model, [(a, 1.0), (b, 0.5)]):
        expected = before[w] + a.delta(w) + 0.5 * b.delta(w)
        assert torch.allclose(params[w].detach(), expected, atol=1e-6)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} not restored"
    tensors, meta = a.to_tensors()
    back = LoraFactors.from_tensors(tensors, meta)
    assert back.name == "a" and torch.equal(back.delta(w), a.delta(w))
