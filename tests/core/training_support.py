"""Helpers for the training tests: a character-level tokenizer with a chat template, built in milliseconds."""

from __future__ import annotations

import string
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>"]


def char_tokenizer() -> Any:
    """A PreTrainedTokenizerFast with one token per printable ASCII character (vocab < 128)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<|im_end|>",
                                  bos_token="<|im_start|>", unk_token="?")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Tiny prompt/completion records: reverse a 3-letter word."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(3))
        out.append({"prompt": f"rev {word}", "completion": word[::-1]})
    return out


def demo_llama(seed: int = 0) -> Any:
    """A 2-layer Llama with room for the demo prompts (the shared tiny_llama stops at 64 positions)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def demo_examples(task: str, n_train: int = 16) -> list[Any]:
    """The training examples of a bundled demo task (seed 0)."""
    from shira_core.demo_data import generate
    from shira_core.training import parse_jsonl
    from shira_core.training.data import examples_to_jsonl

    train, _ = generate(task, seed=0, n_train=n_train)
    return parse_jsonl(examples_to_jsonl(train))
