"""Bundled demo tasks: deterministic by seed, disjoint splits, checkable answers, parseable JSONL."""

from __future__ import annotations

import json

import pytest

from shira_core.demo_data import TASKS, generate
from shira_core.training import parse_jsonl
from shira_core.training.data import examples_to_jsonl


@pytest.mark.parametrize("task", list(TASKS))
def test_same_seed_same_records_other_seed_other_records(task):
    a = generate(task, seed=1)
    assert a == generate(task, seed=1)
    assert a != generate(task, seed=2)


@pytest.mark.parametrize("task", list(TASKS))
def test_splits_are_disjoint_and_parse(task):
    train, held = generate(task, seed=0)
    assert train and held
    prompts = [r["prompt"] for r in train]
    assert len(set(prompts)) == len(prompts)
    assert not set(prompts) & {r["prompt"] for r in held}
    for split in (train, held):
        examples = parse_jsonl(examples_to_jsonl(split), f"{task}.jsonl")
        assert [e.completion for e in examples] == [r["completion"] for r in split]
        assert max(len(r["completion"]) for r in split) <= 48  # short answers: learnable in minutes


def test_answers_are_checkable():
    train, held = generate("kv2json", seed=0, n_train=50, n_eval=20)
    for rec in train + held:
        pairs = rec["prompt"].split(": ", 1)[1].split("; ")
        expected = {k: (int(v) if v.isdigit() else v) for k, v in (p.split("=") for p in pairs)}
        assert json.loads(rec["completion"]) == expected
        assert " " not in rec["completion"]  # compact
    train, held = generate("sentiment", seed=0)
    assert {r["completion"] for r in train + held} == {"positive", "negative"}
    labels = [r["completion"] for r in train]
    assert 0.3 < labels.count("positive") / len(labels) < 0.7


def test_capitals_eval_asks_trained_facts_in_new_words():
    train, held = generate("capitals", seed=0)
    def fact(rec):
        return next(w.strip("?.") for w in rec["prompt"].split() if w[0].isupper() and w.strip("?.") not in
                    ("What", "Name", "Which", "Tell", "The")), rec["completion"]
    train_facts = {fact(r) for r in train}
    assert {fact(r) for r in held} == train_facts
    assert len({c for c, _ in train_facts}) == len(train_facts)  # one capital per country
    templates = {r["prompt"].replace(fact(r)[0], "{c}") for r in train}
    assert not templates & {r["prompt"].replace(fact(r)[0], "{c}") for r in held}


def test_sizes_and_unknown_task():
    train, held = generate("sentiment", seed=0, n_train=10, n_eval=5)
    assert (len(train), len(held)) == (10, 5)
    with pytest.raises(ValueError, match="unknown demo task 'nope'"):
        generate("nope")
    with pytest.raises(ValueError, match="cannot draw"):
        generate("sentiment", n_train=100000)
