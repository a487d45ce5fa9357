"""Inputs the benchmarks share: adapters with random values, and the model to time (the base, or one of its
shape with random weights, for machines without a copy of the real one)."""

from __future__ import annotations

from typing import Any

import torch

from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.masks import rand_mask


def random_adapter(model: torch.nn.Module, names: list[str], density: float, seed: int, name: str) -> SparseAdapter:
    """A rand-mask adapter over `names` with small random deltas."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for pos, n in enumerate(names):
        weight = model.get_parameter(n)
        idx = rand_mask(weight, density, seed=seed * 10_000 + pos)
        deltas[n] = SparseDelta(n, tuple(weight.shape), idx, torch.randn(idx.numel(), generator=gen) * 0.01)
    return SparseAdapter(name, deltas, "rand")


def bench_model(spec: dict[str, Any]) -> torch.nn.Module:
    """spec['base']: 'random' (SmolLM2-135M-shaped, spec['layers'] decoder layers) or a model for load_base;
    spec['device'] and spec['dtype'] ('float32' or 'bfloat16') place it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if spec.get("base", "random") != "random":
        from shira_core.models import load_base

        model, _, _ = load_base(spec["base"], device=spec["device"], dtype=spec["dtype"])
        return model

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=spec["layers"],
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    return LlamaForCausalLM(config).to(dtype=dtype, device=spec["device"])
