"""Sparse-parameter SHiRA training: exact gradients on the mask, no base gradients, bit-exact restore."""

from __future__ import annotations

import copy

import pytest
import torch

from shira_core.errors import MaskError
from shira_core.masks import build_masks
from shira_core.models import linear_weight_names
from shira_core.training import attach_gradient_masks, attach_sparse_params


def _batch(seed: int = 0, n: int = 3, length: int = 10, vocab: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _masks(model: torch.nn.Module, density: float = 0.1, kind: str = "rand") -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return build_masks({n: params[n].detach() for n in linear_weight_names(model)}, kind, density, seed=5)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("grad_method", ["sddmm", "dense"])
def test_value_gradients_equal_dense_gradients_on_the_mask(tiny_llama, grad_method):
    model = tiny_llama(seed=1)
    masks = _masks(model)
    dense = copy.deepcopy(model).train()
    for p in dense.parameters():
        p.requires_grad_(False)
    dparams = dict(dense.named_parameters())
    for n in masks:
        dparams[n].requires_grad_(True)
    dense(**_batch()).loss.backward()

    sparse = attach_sparse_params(model, masks, grad_method=grad_method)
    model.train()
    model(**_batch()).loss.backward()
    assert all(layer.pattern.method == grad_method for layer in sparse._layers.values())  # no silent fallback
    grads = sparse.grads()
    for name, idx in masks.items():
        ref = dparams[name].grad.reshape(-1)[idx]
        assert grads[name] is not None and grads[name].shape == idx.shape
        torch.testing.assert_close(grads[name], ref, rtol=1e-5, atol=1e-7, msg=name)
    # No base parameter got a gradient: nothing dense was kept for the frozen weights.
    assert all(p.grad is None for p in model.parameters())
    sparse.remove()


def test_forward_equals_dense_base_plus_delta(tiny_llama):
    model = tiny_llama(seed=2)
    masks = _masks(model)
    reference = copy.deepcopy(model)
    sparse = attach_sparse_params(model, masks)
    g = torch.Generator().manual_seed(0)
    rparams = dict(reference.named_parameters())
    with torch.no_grad():
        for name, values in zip(sparse.names, sparse.values, strict=True):
            values.copy_(torch.randn(values.shape, generator=g) * 0.05)
            rparams[name].view(-1)[masks[name]] += values
    ids = _batch()["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    sparse.remove()


def test_training_then_remove_restores_base_bit_exact(tiny_llama):
    model = tiny_llama(seed=3)
    before = _snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    masks = _masks(model)
    sparse = attach_sparse_params(model, masks)
    opt = torch.optim.AdamW(sparse.parameters(), lr=1e-2)
    model.train()
    losses = []
    for s in range(4):
        loss = model(**_batch(s % 2)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert any(bool((v != 0).any()) for v in sparse.values)
    adapter = sparse.extract("sp", "rand")
    assert adapter.nnz == sum(m.numel() for m in masks.values())
    sparse.remove()
    sparse.remove()  # idempotent
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} not restored"
        assert p.requires_grad == flags[n]
    modules = dict(model.named_modules())
    assert all("forward" not in vars(modules[n.rpartition(".")[0]]) for n in masks)


def test_both_methods_give_the_same_adapter_after_one_sgd_step(tiny_llama):
    lr = 0.1
    a = tiny_llama(seed=4)
    b = copy.deepcopy(a)
    masks = _masks(a, density=0.05, kind="wm")
    handle = attach_gradient_masks(a, masks)
    opt = torch.optim.SGD(handle.parameters(), lr=lr)
    a.train()
    a(**_batch()).loss.backward()
    opt.step()
    from_hooks = handle.extract("x", "wm")

    sparse = attach_sparse_params(b, masks)
    opt = torch.optim.SGD(sparse.parameters(), lr=lr)
    b.train()
    b(**_batch()).loss.backward()
    opt.step()
    from_params = sparse.extract("x", "wm")
    sparse.remove()

    assert from_hooks.deltas.keys() == from_params.deltas.keys()
    moved = 0
    for name, d in from_hooks.deltas.items():
        e = from_params.deltas[name]
        assert torch.equal(d.indices, e.indices) and d.shape == e.shape
        torch.testing.assert_close(d.values, e.values, rtol=1e-4, atol=1e-6, msg=name)
        moved += int((e.values != 0).sum())
    assert moved > 0


def test_bf16_base_keeps_fp32_values_and_restores(tiny_llama):
    model = tiny_llama(seed=5, dtype=torch.bfloat16)
    before = _snapshot(model)
    masks = _masks(model)
    sparse = attach_sparse_params(model, masks)
    assert all(v.dtype == torch.float32 for v in sparse.values)
    model.train()
    model(**_batch()).loss.backward()
    assert all(g is not None and g.dtype == torch.float32 for g in sparse.grads().values())
    torch.optim.SGD(sparse.parameters(), lr=1.0).step()
    assert sparse.extract("bf", "rand").deltas[sparse.names[0]].values.dtype == torch.bfloat16
    sparse.remove()
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_unsorted_masks_are_sorted_and_repeats_refused(tiny_llama):
    model = tiny_llama(seed=6)
    name = linear_weight_names(model)[0]
    sparse = attach_sparse_params(model, {name: torch.tensor([9, 2, 5])})
    assert sparse.extract("u").deltas[name].indices.tolist() == [2, 5, 9]
    sparse.remove()
    with pytest.raises(MaskError, match="repeats an index"):
        attach_sparse_params(model, {name: torch.tensor([3, 3])})
    with pytest.raises(MaskError, match="outside"):
        attach_sparse_params(model, {name: torch.tensor([10**9])})
