"""Helpers shared by the service tests: a tiny Llama, uploads and requests.

Random adapters come from tests/random_adapters.py, shared with the other test trees.
"""

from __future__ import annotations

import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from service.registry import RedisRegistry
from service.types import AdapterRef, AdapterSet, GenerationRequest, SamplingParams
from shira_core.delta import SparseAdapter
from shira_core.fingerprint import BaseFingerprint
from shira_core.io import adapter_to_bytes

TEST_REDIS_URL = os.environ.get("SHIRA_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def tiny_model(vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


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
