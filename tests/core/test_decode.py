"""The decode-step kernels (shira_core.decode): the native Linear against PyTorch's, row by row independent of the
batch, on the weights the Switcher writes; and DecodeStep against transformers' forward."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import DynamicCache

from shira_core.decode import DecodeLinear, DecodeStep, load, use_decode_linears
from shira_core.switcher import Switcher

from .kernel_support import needs_kernel

pytestmark = needs_kernel

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module", params=["avx512-bf16", "avx512", "avx2"])
def kernel(request):
    k = load()
    assert k is not None, "g++ and ninja are here and the CPU has AVX2: the kernel must load"
    best = k.isa()
    if k.use_isa(request.param) != request.param:
        k.use_isa(best)
        pytest.skip(f"this CPU has no {request.param}")
    yield k
    k.use_isa(best)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n_out", "n_in"), [(576, 576), (5, 37), (130, 64), (3, 1)])
def test_linear_matches_pytorch_within_rounding(kernel, dtype, n_out, n_in):
    gen = torch.Generator().manual_seed(n_out * n_in)
    w = torch.randn(n_out, n_in, generator=gen).to(dtype)
    b = torch.randn(n_out, generator=gen).to(dtype)
    for rows in (1, 3, 4, 9):
        x = torch.randn(rows, 1, n_in, generator=gen).to(dtype)
        want = F.linear(x.float(), w.float(), b.float())
        got = kernel.linear(x, w, b)
        assert got.shape == (rows, 1, n_out) and got.dtype == dtype
        scale = want.abs().max().item() + 1
        assert (got.float() - want).abs().max().item() <= TOL[dtype] * scale * max(1, n_in**0.5)
        assert torch.allclose(kernel.linear(x, w, None).float(), F.linear(x.float(), w.float()), atol=scale * 0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_is_the_same_alone_and_in_any_batch(kernel, dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(300, 200, generator=gen).to(dtype)
    x = torch.randn(11, 1, 200, generator=gen).to(dtype)
    together = kernel.linear(x, w, None)
    for i in range(11):
        assert torch.equal(kernel.linear(x[i : i + 1], w, None), together[i : i + 1])
    assert torch.equal(kernel.linear(x[2:7], w, None), together[2:7])
    # a prefill: 3 prompts of 50 tokens, rows in chunks of 64 (one chunk ends mid-prompt)
    prompts = torch.randn(3, 50, 200, generator=gen).to(dtype)
    batched = kernel.linear(prompts, w, None)
    assert batched.shape == (3, 50, 300)
    for i in range(3):
        assert torch.equal(kernel.linear(prompts[i : i + 1], w, None), batched[i : i + 1])
    assert torch.equal(kernel.linear(prompts[1, 7:8], w, None), batched[1, 7:8])


def test_wrong_inputs_are_refused_with_the_reason(kernel):
    with pytest.raises(RuntimeError, match="features"):
        kernel.linear(torch.zeros(1, 1, 5), torch.zeros(4, 6), None)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.linear(torch.zeros(1, 1, 4), torch.zeros(4, 6).t(), None)
    with pytest.raises(RuntimeError, match="dtype"):
        kernel.linear(torch.zeros(1, 1, 4, dtype=torch.float64), torch.zeros(6, 4, dtype=torch.float64), None)


def test_decode_linears_run_without_autograd_and_see_writes_into_the_switchers_buffer(tiny_llama):
    model = tiny_llama(hidden=64)
    assert use_decode_linears(model) == 15  # 7 a layer, and the lm_head
    lin = model.model.layers[0].mlp.up_proj
    assert isinstance(lin, DecodeLinear) and isinstance(lin, torch.nn.Linear)
    x = torch.randn(3, 1, 64)
    switcher = Switcher(model)
    with torch.inference_mode():
        base = lin(x)
        with torch.no_grad():
            lin.weight[5, 7] += 1.0  # the weight is a view of the Switcher's flat buffer, which a scatter writes
        changed = lin(x)
        lin.weight.data[5, 7] -= 1.0
    assert not torch.equal(base, changed) and torch.equal(base[..., :5], changed[..., :5])
    assert torch.allclose(changed[..., 5] - base[..., 5], x[:, :, 7], atol=1e-5)
    assert switcher.names  # bound over the DecodeLinear weights
    # With autograd on (training), nn.Linear's own forward runs: exactly PyTorch's product.
    x2 = torch.randn(2, 3, 64)
    assert torch.equal(lin(x2), F.linear(x2, lin.weight))
    y = lin(x)
    assert y.requires_grad and torch.equal(y, F.linear(x, lin.weight))


@pytest.mark.parametrize("isa", ["avx2", "avx512", "avx512-bf16"])
def test_prefills_take_the_kernel_unless_the_cpu_has_bf16_dot_products(monkeypatch, isa):
    """Without AVX512-BF16, PyTorch's bf16 products ran 4x slower than the kernel's (Zen 3); with it, oneDNN's win."""
    import types

    from shira_core.decode import linear

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(64, 32).to(torch.bfloat16))
    assert use_decode_linears(model) == 2
    calls = []
    real = DecodeLinear.kernel

    def spy(x, weight, bias):
        calls.append(weight.dtype)
        return real.linear(x, weight, bias)

    monkeypatch.setattr(DecodeLinear, "kernel", types.SimpleNamespace(linear=spy))
    monkeypatch.setattr(DecodeLinear, "prefills", linear.prefill_dtypes(isa))
    with torch.inference_mode():
        for lin in model:
            prefill = torch.randn(2, 9, 64, dtype=lin.weight.dtype)
            assert torch.allclose(lin(prefill).float(), F.linear(prefill, lin.weight, lin.bias).float(),
                                  atol=TOL[lin.weight.dtype])
            lin(prefill[:, :1])  # a decode step's pass: always the kernel
    bf16_prefill = [torch.bfloat16] if isa != "avx512-bf16" else []
    assert calls == [torch.float32, torch.float32, *bf16_prefill, torch.bfloat16]


def _qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        for layer in model.model.layers:  # biases are zero at init; make them count
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_()
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_matches_transformers_forward_with_left_padding(tiny_llama, family, dtype):
    model = (tiny_llama(hidden=64, vocab=80, layers=3) if family == "llama" else _qwen2()).to(dtype)
    step = DecodeStep.for_model(model)
    assert step is not None
    use_decode_linears(model)
    ids = torch.randint(0, 80, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0  # row 1 is left-padded by two
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        ours, theirs = DynamicCache(config=model.config), DynamicCache(config=model.config)
        for cache in (ours, theirs):
            model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        token, pos = ids[:, -1], positions[:, -1]
        for n in range(70):  # past one buffer's room (64), so the cache moves once
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            pos = pos + 1
            want = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos[:, None],
                         cache=theirs, use_cache=True).logits[:, -1]
            got = step(token, pos, mask, ours)
            assert got.shape == want.shape and got.dtype == want.dtype
            tol = 1e-4 if dtype == torch.float32 else 0.1
            assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), (n, (got - want).abs().max())
            token = want.argmax(-1)
        assert ours.get_seq_length() == theirs.get_seq_length() == 6 + 70
        assert torch.allclose(ours.layers[0].keys.float(), theirs.layers[0].keys.float(), atol=tol)


def test_decode_step_after_the_cache_rows_change(tiny_llama):
    """RowBatch replaces a layer's tensors when rows leave or join; the next step moves them into a new buffer."""
    model = tiny_llama(hidden=64, vocab=80)
    step = DecodeStep.for_model(model)
    use_decode_linears(model)  # PyTorch's product of 2 rows may round a row unlike its product of 1
    ids = torch.randint(0, 80, (3, 4), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 5, dtype=torch.long)
    pos = torch.full((3,), 4)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, cache=cache, use_cache=True)
        three = step(ids[:, -1], pos, mask, cache)
        alone = DynamicCache(config=model.config)  # row 2's cache on its own: a copy, not the step's buffer
        for mine, theirs in zip(alone.layers, cache.layers, strict=True):
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys, mine.values = theirs.keys[2:].clone(), theirs.values[2:].clone()
        cache.batch_select_indices(torch.tensor([0, 2]))  # row 1 leaves
        mask, pos = torch.ones(2, 6, dtype=torch.long), torch.full((2,), 5)
        two = step(three[[0, 2]].argmax(-1), pos, mask, cache)
        one = step(three[2:].argmax(-1), torch.full((1,), 5), torch.ones(1, 6, dtype=torch.long), alone)
    assert torch.equal(two[1:], one)
    assert cache.get_seq_length() == alone.get_seq_length() == 6


def test_models_the_step_does_not_compute_exactly_keep_their_forward():
    from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=2)).eval()
    mistral = MistralForCausalLM(MistralConfig(vocab_size=40, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                               sliding_window=16)).eval()
    assert DecodeStep.for_model(gpt2) is None
    assert DecodeStep.for_model(mistral) is None


@pytest.mark.parametrize("native", [False, True], ids=["torch-products", "native-corrections"])
def test_mixed_rows_are_corrected_inside_fused_decode_steps(tiny_llama, native):
    """With the RowCorrector's hooks on DecodeLinear layers, DecodeStep's fused q/k/v and gate/up calls still give each
    row its own adapter set: the same logits as the set applied to the weights, the row alone."""
    from random_adapters import random_adapter

    from shira_core.batched import RowCorrector

    model = tiny_llama(seed=3, vocab=64, hidden=64)
    switcher = Switcher(model)
    use_decode_linears(model)
    corrector = RowCorrector(model, switcher, native=native)
    step = DecodeStep.for_model(model)
    adapters = [random_adapter(model, f"s{i}", i + 1, std=0.3, mask_seed_step=100) for i in range(2)]
    plans = [switcher.prepare([(a, 1.0)]) for a in adapters]
    sets = [0, None, 1]
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    token, pos, mask = ids[:, -1], torch.full((3,), 5), torch.ones(3, 6, dtype=torch.long)

    def prefilled(rows: slice):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[rows], cache=cache, use_cache=True)
        return cache

    with torch.inference_mode():
        want = []
        for r, s in enumerate(sets):
            switcher.apply(plans[s]) if s is not None else switcher.revert()
            want.append(step(token[r : r + 1], pos[:1], mask[:1], prefilled(slice(r, r + 1)))[0])
        switcher.revert()
        caches = [prefilled(slice(r, r + 1)) for r in range(3)]  # each row's cache prefilled under the base
        for r, s in enumerate(sets):  # as the service prefills a joiner: under its own set
            switcher.apply(plans[s]) if s is not None else switcher.revert()
            caches[r] = prefilled(slice(r, r + 1))
        switcher.revert()
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(cache.layers):
            layer.lazy_initialization(caches[0].layers[i].keys, caches[0].layers[i].values)
            layer.keys = torch.cat([c.layers[i].keys for c in caches])
            layer.values = torch.cat([c.layers[i].values for c in caches])
        terms = [((corrector.delta(plans[s]),) if s is not None else ()) for s in sets]
        with corrector.active(corrector.decode_plan(terms)):
            got = step(token, pos, mask, cache)
    corrector.close()
    assert "forward" not in model.model.layers[0].self_attn.q_proj.__dict__  # hooked, not wrapped: still fused
    for r in range(3):
        assert torch.allclose(got[r], torch.stack(want)[r], atol=1e-4), (r, (got[r] - want[r]).abs().max())


def test_a_model_without_cpu_linears_never_loads_the_kernel(tiny_llama, monkeypatch):
    """A CUDA model (here: one whose layers the kernel does not take) must not build the kernel at start-up."""
    from shira_core.decode import linear

    model = tiny_llama().to(torch.float64)  # no layer in a dtype the kernel reads
    monkeypatch.setattr(linear, "load", lambda: pytest.fail("loaded the kernel for a model it cannot serve"))
    assert use_decode_linears(model) == 0
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())
