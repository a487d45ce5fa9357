"""Instruction data for SHiRA training: JSONL records, chat-template encoding, padded batches.

A record is ``{"prompt": ..., "completion": ...}`` or ``{"messages": [{"role", "content"}, ...]}`` whose last
message is the assistant's answer. The prompt goes through the tokenizer's chat template with the generation
prompt appended; the completion follows with the end-of-sequence token. Loss is taken on the completion only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ShiraError

IGNORE_INDEX = -100


class TrainingDataError(ShiraError):
    """Training or evaluation data is malformed or cannot be encoded."""


@dataclass(frozen=True)
class Example:
    """One instruction example. `messages` is the chat before the answer; `completion` is the answer."""

    messages: tuple[tuple[str, str], ...]
    completion: str

    @property
    def prompt(self) -> str:
        return self.messages[-1][1]


@dataclass
class Encoded:
    """Token ids of one example: the prompt part and the completion part (eos included)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    completion: str

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def _record_to_example(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise TrainingDataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise TrainingDataError(f"{where}: 'messages' must be a list of at least 2 messages (user, assistant)")
        pairs = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TrainingDataError(f"{where}: message {i} needs string fields 'role' and 'content'")
            pairs.append((m["role"], m["content"]))
        if pairs[-1][0] != "assistant":
            raise TrainingDataError(
                f"{where}: the last message must have role 'assistant' (it is the completion), got {pairs[-1][0]!r}"
            )
        return Example(tuple(pairs[:-1]), pairs[-1][1])
    missing = [k for k in ("prompt", "completion") if k not in record]
    if missing:
        raise TrainingDataError(
            f"{where}: missing {' and '.join(repr(k) for k in missing)}; each line needs 'prompt' and "
            f"'completion' strings, or a 'messages' list (found keys {sorted(record)})"
        )
    for key in ("prompt", "completion"):
        if not isinstance(record[key], str):
            raise TrainingDataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
    if not record["completion"].strip():
        raise TrainingDataError(f"{where}: 'completion' is empty, so there is nothing to learn")
    return Example((("user", record["prompt"]),), record["completion"])


def parse_jsonl(text: str, source: str = "data") -> list[Example]:
    """Parses JSONL text into examples; blank lines are skipped.

    Args:
        text: the file contents.
        source: file name used in error messages.

    Returns:
        The examples in file order. Raises TrainingDataError naming the line and what is missing.
    """
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e
        out.append(_record_to_example(record, where))
    if not out:
        raise TrainingDataError(f"{source} holds no examples")
    return out


def examples_to_jsonl(examples: Sequence[dict[str, Any]]) -> str:
    """Serialises records (dicts) one per line, the inverse of parse_jsonl for prompt/completion records."""
    return "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples)


def prompt_text(tokenizer: Any, example: Example) -> str:
    """The chat-templated prompt with the assistant turn opened; plain text for tokenizers without a template."""
    messages = [{"role": r, "content": c} for r, c in example.messages]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(c for _, c in example.messages) + "\n"


def encode(tokenizer: Any, example: Example, max_len: int) -> Encoded:
    """Tokenizes one example; an over-long prompt loses its start, then the completion loses its end."""
    if tokenizer.eos_token_id is None:
        raise TrainingDataError("the tokenizer has no eos token, so completions cannot be terminated")
    prompt = tokenizer(prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]
    completion = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    completion = completion[:max_len - 1]
    keep = max_len - len(completion)
    prompt = prompt[len(prompt) - keep:] if len(prompt) > keep else prompt
    return Encoded(list(prompt), list(completion), example.completion)


def encode_all(tokenizer: Any, examples: Sequence[Example], max_len: int) -> list[Encoded]:
    if max_len < 2:
        raise TrainingDataError(f"max_len must be at least 2 tokens, got {max_len}")
    return [encode(tokenizer, e, max_len) for e in examples]


def collate(items: Sequence[Encoded], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX on prompt and padding)."""
    width = max(e.length for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        seq = e.prompt_ids + e.completion_ids
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, len(e.prompt_ids) : len(seq)] = torch.tensor(e.completion_ids)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def batch_order(n: int, batch_size: int, seed: int, shuffle: bool = True) -> list[list[int]]:
    """Deterministic batches of example positions: the same (n, batch_size, seed) always gives the same order."""
    if batch_size < 1:
        raise TrainingDataError(f"batch size must be at least 1, got {batch_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def iter_batches(
    items: Sequence[Encoded], batch_size: int, seed: int, pad_id: int, device: torch.device | str, shuffle: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Yields collated batches in batch_order."""
    for positions in batch_order(len(items), batch_size, seed, shuffle):
        yield collate([items[p] for p in positions], pad_id, device)
