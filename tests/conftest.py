"""Shared test helpers: tiny models built in the test itself, so unit tests never load the real base."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch


def build_tiny_llama(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    *,
    tie: bool = True,
    vocab: int = 64,
    hidden: int = 32,
    layers: int = 2,
) -> torch.nn.Module:
    """A LlamaForCausalLM small enough to build in milliseconds, in eval mode.

    Args:
        seed: torch seed for the random init; two seeds give two different base models.
        dtype: parameter dtype.
        tie: tie lm_head.weight to model.embed_tokens.weight (one Parameter under two names).
        vocab, hidden, layers: sizes; intermediate is 2 * hidden, 4 heads, 2 key/value heads.

    Returns:
        The model.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_llama() -> Callable[..., torch.nn.Module]:
    """Factory fixture: ``tiny_llama(seed=0, dtype=torch.float32, tie=True, vocab=64, hidden=32, layers=2)``."""
    return build_tiny_llama


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory):
    """One SHIRA_DATA_DIR for the session: the real model is converted from its GGUF file once (~20 s), and
    every later load in the session reads the converted copy under data_dir/models (~1 s)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def tokenizer():
    """The bundled model's tokenizer, read from its GGUF file once for the whole session (~20 s)."""
    from transformers import AutoTokenizer

    from shira_core.models import resolve

    source = resolve(None)
    tok = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok
