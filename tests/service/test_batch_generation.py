"""The batched decode loop on a tiny random Llama with the bundled model's tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from service.batch_generation import BatchGenerator, Row
from service.generation import SamplingParams

PROMPTS = ["Hello", "The capital of France is", "One two three four five six seven", "a b"]


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gen(model, tokenizer):
    return BatchGenerator(model, tokenizer, eos_ids={tokenizer.eos_token_id})


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text).input_ids


@torch.inference_mode()
def reference_greedy(model, prompt: list[int], n: int, eos: int) -> list[int]:
    """Plain greedy decoding without cache or padding: the full sequence is run every step."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
        out.append(token)
        seq.append(token)
        if token == eos:
            break
    return out


def greedy(n: int = 12, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, **kw)


def test_greedy_batch_equals_each_request_alone(gen, model, tokenizer):
    rows = [Row(ids(tokenizer, p), greedy(n=8 + 3 * i)) for i, p in enumerate(PROMPTS)]
    produced = gen.run(rows)
    for row in rows:
        expected = reference_greedy(model, row.prompt_ids, row.params.max_new_tokens, tokenizer.eos_token_id)
        assert row.tokens == expected
        assert row.finish_reason == ("stop" if expected[-1] == tokenizer.eos_token_id else "length")
        assert row.text == tokenizer.decode(
            [t for t in expected if t != tokenizer.eos_token_id], skip_special_tokens=True
        )
    assert produced == sum(len(r.tokens) for r in rows)


def test_rows_joining_mid_batch_match_their_solo_output(gen, model, tokenizer):
    first = [Row(ids(tokenizer, PROMPTS[0]), greedy(n=10))]
    late = [Row(ids(tokenizer, PROMPTS[2]), greedy(n=6)), Row(ids(tokenizer, PROMPTS[3]), greedy(n=9))]
    calls = []

    def admit(room: int) -> list[Row]:
        calls.append(room)
        if len(calls) == 3:
            return late
        return []

    gen.run(first, admit=admit, max_rows=4)
    assert calls[2] == 3  # one row running, room for three
    for row in first + late:
        assert row.tokens == reference_greedy(model, row.prompt_ids, row.params.max_new_tokens, -1)


def test_cancelled_row_leaves_and_others_continue(gen, model, tokenizer):
    state = {"steps": 0}

    def cancel_after_three() -> bool:
        state["steps"] += 1
        return state["steps"] > 3

    done = []
    gone = Row(ids(tokenizer, PROMPTS[1]), greedy(n=20), cancelled=cancel_after_three, on_done=done.append)
    stays = Row(ids(tokenizer, PROMPTS[2]), greedy(n=15), on_done=done.append)
    gen.run([gone, stays])
    assert gone.finish_reason == "cancelled" and len(gone.tokens) == 3
    assert stays.tokens == reference_greedy(model, stays.prompt_ids, 15, -1)
    assert done[0] is gone and done[1] is stays


def test_eos_ends_a_row(model, tokenizer):
    prompt = ids(tokenizer, PROMPTS[1])
    free = reference_greedy(model, prompt, 6, -1)
    gen = BatchGenerator(model, tokenizer, eos_ids={free[3]})
    row = Row(prompt, greedy(n=20))
    gen.run([row])
    cut = free.index(free[3]) + 1
    assert row.tokens == free[:cut] and row.finish_reason == "stop"


def test_stop_string_is_cut_and_streaming_deltas_add_up(gen, tokenizer):
    prompt = ids(tokenizer, PROMPTS[1])
    plain = Row(prompt, greedy(n=16))
    gen.run([plain])
    text = plain.text
    assert len(text) > 8
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    pieces = []
    row = Row(prompt, greedy(n=16, stop=(stop,)), on_text=pieces.append)
    gen.run([row])
    assert row.text == text[: text.index(stop)]
    assert row.finish_reason == "stop"
    assert "".join(pieces) == row.text
    assert stop not in "".join(pieces)

    streamed = []
    full = Row(prompt, greedy(n=16), on_text=streamed.append)
    gen.run([full])
    assert "".join(streamed) == full.text == text
    assert len(streamed) > 1


def test_seeded_sampling_is_reproducible_and_independent_of_batch(gen, tokenizer):
    prompt = ids(tokenizer, PROMPTS[0])

    def sample(seed: int, top_p: float = 1.0, with_neighbours: bool = False) -> list[int]:
        row = Row(prompt, SamplingParams(max_new_tokens=12, temperature=1.5, top_p=top_p, seed=seed))
        others = [Row(ids(tokenizer, p), greedy(n=5)) for p in PROMPTS[1:]] if with_neighbours else []
        gen.run([row, *others])
        return row.tokens

    a = sample(1)
    assert a == sample(1)
    assert a == sample(1, with_neighbours=True)
    assert a != sample(2)
    narrow = sample(3, top_p=1e-6)  # top_p that small keeps only the most likely token: greedy
    assert narrow == reference_greedy(gen.model, prompt, 12, -1)


def test_max_new_tokens_one_finishes_at_prefill(gen, model, tokenizer):
    rows = [Row(ids(tokenizer, p), greedy(n=1)) for p in PROMPTS]
    assert gen.run(rows) == len(PROMPTS)
    for row in rows:
        assert row.finish_reason in ("length", "stop") and len(row.tokens) == 1
        assert row.tokens == reference_greedy(model, row.prompt_ids, 1, -1)
