"""Instruction JSONL: parsing errors name the line; encoding masks the prompt; batches are deterministic."""

from __future__ import annotations

import json

import pytest
import torch

from shira_core.training import TrainingDataError, collate, encode, parse_jsonl
from shira_core.training.data import IGNORE_INDEX, batch_order, examples_to_jsonl, prompt_text

from .training_support import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_parses_both_record_kinds_and_skips_blank_lines():
    text = (
        json.dumps({"prompt": "p1", "completion": "c1"}) + "\n\n"
        + json.dumps({"messages": [{"role": "system", "content": "be short"}, {"role": "user", "content": "p2"},
                                   {"role": "assistant", "content": "c2"}]}) + "\n"
    )
    a, b = parse_jsonl(text, "t.jsonl")
    assert a.messages == (("user", "p1"),) and a.completion == "c1"
    assert b.messages == (("system", "be short"), ("user", "p2")) and b.completion == "c2"
    assert parse_jsonl(examples_to_jsonl([{"prompt": "x", "completion": "y"}]))[0].completion == "y"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x"', "train.jsonl line 2: not valid JSON"),
        ('{"prompt": "x"}', "train.jsonl line 2: missing 'completion'"),
        ('{"text": "x"}', "missing 'prompt' and 'completion'"),
        ('["x"]', "expected a JSON object"),
        ('{"prompt": "x", "completion": 3}', "'completion' must be a string"),
        ('{"prompt": "x", "completion": "  "}', "'completion' is empty"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "at least 2 messages"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}',
         "last message must have role 'assistant'"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', "message 0 needs"),
    ],
)
def test_bad_lines_name_the_line_and_the_problem(line, message):
    good = json.dumps({"prompt": "a", "completion": "b"})
    with pytest.raises(TrainingDataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_jsonl(good + "\n" + line + "\n", "train.jsonl")


def test_empty_file_is_refused():
    with pytest.raises(TrainingDataError, match="no examples"):
        parse_jsonl("\n\n", "eval.jsonl")


def test_encoding_puts_loss_on_completion_and_eos_only(tok):
    ex = parse_jsonl(json.dumps({"prompt": "rev abc", "completion": "cba"}))[0]
    enc = encode(tok, ex, max_len=64)
    assert tok.decode(enc.prompt_ids) == prompt_text(tok, ex)
    assert prompt_text(tok, ex).endswith("<|im_start|>assistant\n")
    assert enc.completion_ids == tok("cba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    short = encode(tok, parse_jsonl(json.dumps({"prompt": "r", "completion": "z"}))[0], 64)
    batch = collate([enc, short], tok.pad_token_id)
    labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
    n_prompt = len(enc.prompt_ids)
    assert bool((labels[0, :n_prompt] == IGNORE_INDEX).all())
    assert labels[0, n_prompt:].tolist() == enc.completion_ids
    assert int(mask[1].sum()) == short.length and bool((labels[1, short.length:] == IGNORE_INDEX).all())
    assert bool((ids[1, short.length:] == tok.pad_token_id).all())


def test_truncation_keeps_the_completion(tok):
    ex = parse_jsonl(json.dumps({"prompt": "x" * 200, "completion": "answer"}))[0]
    enc = encode(tok, ex, max_len=40)
    assert enc.length == 40
    assert enc.completion_ids[-1] == tok.eos_token_id and len(enc.completion_ids) == 7
    assert tok.decode(enc.prompt_ids).endswith("<|im_start|>assistant\n")  # the start was cut, not the end


def test_batch_order_is_deterministic_and_complete():
    a = batch_order(23, 5, seed=7)
    assert a == batch_order(23, 5, seed=7)
    assert a != batch_order(23, 5, seed=8)
    assert sorted(i for b in a for i in b) == list(range(23))
    assert [len(b) for b in a] == [5, 5, 5, 5, 3]
    assert torch.tensor(batch_order(4, 2, 0, shuffle=False)).tolist() == [[0, 1], [2, 3]]
    with pytest.raises(TrainingDataError, match="batch size"):
        batch_order(3, 0, 0)
