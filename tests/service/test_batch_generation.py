"""The batched decode loop on a tiny random Llama with the bundled tokenizer; one row's failure stays its own."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig, LlamaForCausalLM

from service.batch_generation import BatchGenerator, Row
from service.sampling import sample
from service.types import SamplingParams

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


def test_ignore_eos_decodes_to_the_token_limit(model, tokenizer):
    prompt = ids(tokenizer, PROMPTS[1])
    free = reference_greedy(model, prompt, 8, -1)
    gen = BatchGenerator(model, tokenizer, eos_ids={free[3]})
    stops, runs_on = Row(prompt, greedy(n=8)), Row(prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))
    gen.run([stops, runs_on])
    assert stops.finish_reason == "stop" and len(stops.tokens) < 8
    assert runs_on.tokens == free and runs_on.finish_reason == "length"


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


# -- one row's failure stays its own -----------------------------------------------------------------


class FailingCorrections:
    """A RowCorrections double: forward passes run plainly, except that any pass holding a row of `bad` raises."""

    def __init__(self, bad: str, phase: str, after_tokens: int = 0) -> None:
        self.bad, self.phase, self.after_tokens = bad, phase, after_tokens

    def _check(self, rows: list[Row], phase: str) -> contextlib.AbstractContextManager[None]:
        if phase == self.phase and any(r.set_key == self.bad and len(r.tokens) >= self.after_tokens for r in rows):
            raise RuntimeError(f"injected failure in a {phase} pass")
        return contextlib.nullcontext()

    def prefill(self, rows: list[Row], running: list[Row]) -> contextlib.AbstractContextManager[None]:
        return self._check(rows, "prefill")

    def decode(self, rows: list[Row]) -> contextlib.AbstractContextManager[None]:
        return self._check(rows, "decode")


def expect_reference(model, rows: list[Row]) -> None:
    for row in rows:
        assert row.error is None
        assert row.tokens == reference_greedy(model, row.prompt_ids, row.params.max_new_tokens, -1)


def test_a_row_whose_decode_pass_fails_leaves_alone(gen, model, tokenizer):
    done = []
    rows = [Row(ids(tokenizer, p), greedy(n=10), set_key=k, on_done=done.append)
            for p, k in zip(PROMPTS[:3], ["a", "bad", "b"], strict=True)]
    gen.run(rows, corrections=FailingCorrections("bad", "decode", after_tokens=3))
    bad = rows[1]
    assert bad.finish_reason == "error" and "injected" in str(bad.error) and len(bad.tokens) == 3
    assert bad in done and len(done) == 3  # every row is reported, the failed one too
    expect_reference(model, [rows[0], rows[2]])


def test_a_joiner_whose_prefill_fails_leaves_alone_and_the_batch_goes_on(gen, model, tokenizer):
    first = [Row(ids(tokenizer, PROMPTS[0]), greedy(n=10), set_key="a")]
    late = [Row(ids(tokenizer, PROMPTS[2]), greedy(n=6), set_key="bad"),
            Row(ids(tokenizer, PROMPTS[3]), greedy(n=7), set_key="b")]
    calls = []

    def admit(room: int) -> list[Row]:
        calls.append(room)
        return late if len(calls) == 2 else []

    gen.run(first, admit=admit, corrections=FailingCorrections("bad", "prefill"))
    assert late[0].finish_reason == "error" and late[0].tokens == []
    expect_reference(model, [first[0], late[1]])


def test_a_poisoned_prompt_fails_alone_in_a_shared_prefill(gen, model, tokenizer):
    vocab = model.config.vocab_size
    rows = [Row(ids(tokenizer, PROMPTS[0]), greedy(n=6)), Row([5, vocab + 7], greedy(n=6)),
            Row(ids(tokenizer, PROMPTS[1]), greedy(n=6))]
    gen.run(rows)
    assert rows[1].finish_reason == "error" and isinstance(rows[1].error, IndexError)
    expect_reference(model, [rows[0], rows[2]])


def test_a_failing_stream_callback_ends_only_its_own_row(gen, model, tokenizer):
    def broken(text: str) -> None:
        raise ConnectionResetError("the client's stream is gone")

    rows = [Row(ids(tokenizer, PROMPTS[0]), greedy(n=8)), Row(ids(tokenizer, PROMPTS[1]), greedy(n=8), on_text=broken),
            Row(ids(tokenizer, PROMPTS[2]), greedy(n=8), on_text=lambda text: None)]
    gen.run(rows)
    assert isinstance(rows[1].error, ConnectionResetError)
    expect_reference(model, [rows[0], rows[2]])


def test_extreme_temperature_and_top_p_leave_the_batch_running(gen, model, tokenizer):
    """The reliability issue's first defect: top_p=1e-300 or temperature=1e-39 underflowed in fp32 and made
    torch.multinomial raise, which failed every row of the batch."""
    prompt = ids(tokenizer, PROMPTS[0])
    tiny_p = Row(prompt, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-300, seed=1))
    tiny_t = Row(prompt, SamplingParams(max_new_tokens=8, temperature=1e-39, seed=1))
    denormal_p = Row(prompt, SamplingParams(max_new_tokens=8, temperature=1.0, top_p=5e-324, seed=1))
    plain = Row(ids(tokenizer, PROMPTS[1]), greedy(n=8))
    gen.run([tiny_p, tiny_t, denormal_p, plain])
    expected = reference_greedy(model, prompt, 8, -1)
    assert tiny_p.tokens == expected and denormal_p.tokens == expected  # only the top token survives top_p
    assert tiny_t.tokens == expected  # T floored to 1e-4: the top token by a wide margin
    expect_reference(model, [plain])


floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
settings_ = st.tuples(
    st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1e6), st.sampled_from([5e-324, 1e-300, 1e-39])),
    st.one_of(st.floats(min_value=0.0, max_value=1.0, exclude_min=True), st.sampled_from([5e-324, 1e-300, 1.0])),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(1, 4).flatmap(lambda v: st.lists(st.lists(floats, min_size=v, max_size=v), min_size=1, max_size=4)),
       st.lists(settings_, min_size=4, max_size=4))
def test_sampling_never_raises_on_extreme_logits_and_settings(logits, params):
    rows = []
    for (temperature, top_p), _ in zip(params, logits, strict=False):
        row = Row([1], SamplingParams(temperature=temperature, top_p=top_p, seed=0))
        if temperature > 0:
            row.generator = torch.Generator().manual_seed(0)
        rows.append(row)
    picked = sample(torch.tensor(logits, dtype=torch.float32), rows)
    assert picked.shape == (len(logits),)
    assert all(0 <= int(t) < len(logits[0]) for t in picked)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sampling_in_half_precision_logits(dtype):
    logits = torch.tensor([[0.0, 60000.0, -60000.0], [1.0, 1.0, 1.0]], dtype=dtype)
    rows = [Row([1], SamplingParams(temperature=1e-30, top_p=1e-40, seed=0)) for _ in range(2)]
    for row in rows:
        row.generator = torch.Generator().manual_seed(0)
    assert sample(logits, rows).tolist()[0] == 1
