"""Helpers shared by the service tests: a tiny Llama, random adapters, uploads and requests."""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from service.generation import AdapterRef, AdapterSet, GenerationRequest, SamplingParams
from service.registry import RedisRegistry
from shira_core.delta import SparseAdapter, SparseDelta
from shira_core.fingerprint import BaseFingerprint
from shira_core.io import adapter_to_bytes
from shira_core.masks import rand_mask
from shira_core.models import linear_weight_names

TEST_REDIS_URL = os.environ.get("SHIRA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def tiny_model(vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def random_adapter(model, name: str, seed: int, density: float, std: float) -> SparseAdapter:
    """A SHiRA-Rand adapter over every linear weight, values ~ N(0, std), with the model's fingerprint."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for i, layer in enumerate(linear_weight_names(model)):
        weight = params[layer]
        idx = rand_mask(weight, density, seed=seed * 1000 + i).cpu()
        deltas[layer] = SparseDelta(layer, tuple(weight.shape), idx, torch.randn(idx.numel(), generator=gen) * std)
    return SparseAdapter(name, deltas, "rand", BaseFingerprint.of(model).to_dict(deltas))


def upload(registry: RedisRegistry, adapter: SparseAdapter, fingerprint: BaseFingerprint):
    info = {"nnz": adapter.nnz, "density": adapter.density, "layers": len(adapter), "mask": adapter.mask,
            "base_fingerprint": fingerprint.id}
    return registry.put(adapter.name, adapter_to_bytes(adapter), info)


def request(ids: list[int], *names: str, n: int = 8, merge: str = "linear", weights=None) -> GenerationRequest:
    weights = weights or [1.0] * len(names)
    refs = tuple(AdapterRef(name, None, w) for name, w in zip(names, weights, strict=True))
    return GenerationRequest(ids, SamplingParams(max_new_tokens=n), AdapterSet(refs, merge))


@torch.inference_mode()
def hf_greedy(model, tok, ids: list[int], n: int) -> str:
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)
