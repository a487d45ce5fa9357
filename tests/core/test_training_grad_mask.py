"""Gradient-mask SHiRA training: only masked entries move, under plain loops, AdamW and HF Trainer."""

from __future__ import annotations

import torch

from shira_core.masks import build_masks
from shira_core.models import linear_weight_names
from shira_core.training import attach_gradient_masks, extract_adapter


def _batch(seed: int = 0, n: int = 4, length: int = 12, vocab: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _masks(model: torch.nn.Module, density: float = 0.1) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    names = linear_weight_names(model)
    return build_masks({n: params[n].detach() for n in names}, "rand", density, seed=3)


def _changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """name -> flat indices that differ from the snapshot."""
    now = dict(model.named_parameters())
    return {n: torch.nonzero(now[n].detach().reshape(-1) != w.reshape(-1)).reshape(-1) for n, w in before.items()}


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    model.train()
    for s in range(steps):
        model(**_batch(s)).loss.backward()
        opt.step()
        opt.zero_grad()


def test_only_masked_entries_change_with_adamw(tiny_llama):
    model = tiny_llama(seed=1)
    masks = _masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = attach_gradient_masks(model, masks)
    opt = torch.optim.AdamW(handle.param_groups(lr=1e-2, weight_decay=0.1))
    assert opt.param_groups[0]["weight_decay"] == 0.0  # forced off, see module docstring
    _train(model, opt)
    changed = _changed(before, model)
    for name, idx in changed.items():
        if name in masks:
            assert idx.numel() > 0, f"{name} did not train"
            assert bool(torch.isin(idx, masks[name]).all()), f"{name} changed outside its mask"
        else:
            assert idx.numel() == 0, f"frozen parameter {name} changed at {idx.numel()} entries"


def test_weight_decay_would_move_unmasked_entries_unless_disabled(tiny_llama):
    model = tiny_llama(seed=1)
    masks = _masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = attach_gradient_masks(model, masks)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, opt, steps=1)
    name = next(iter(masks))
    outside = ~torch.isin(_changed(before, model)[name], masks[name])
    assert int(outside.sum()) > 0  # the hazard is real: decoupled decay shrinks every entry
    handle.restore_base()
    handle.remove()

    model = tiny_llama(seed=1)
    handle = attach_gradient_masks(model, masks)
    opt = torch.optim.AdamW(handle.parameters(), lr=1e-2, weight_decay=0.1)
    handle.disable_weight_decay(opt)
    _train(model, opt, steps=2)
    for n, idx in _changed(before, model).items():
        allowed = masks.get(n, torch.empty(0, dtype=torch.int64))
        assert bool(torch.isin(idx, allowed).all()), n


def test_extract_restore_and_remove(tiny_llama):
    model = tiny_llama(seed=2)
    masks = _masks(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    handle = attach_gradient_masks(model, masks)
    _train(model, torch.optim.SGD(handle.parameters(), lr=0.5), steps=2)
    adapter = handle.extract("gm", "rand")
    params = dict(model.named_parameters())
    for name, delta in adapter.deltas.items():
        idx = masks[name]
        assert torch.equal(delta.indices.long(), idx)
        expected = params[name].detach().reshape(-1)[idx] - before[name].reshape(-1)[idx]
        assert torch.equal(delta.values, expected)
    assert adapter.nnz == sum(m.numel() for m in masks.values())
    same = extract_adapter(model, handle.base_values, masks, "gm", "rand")
    assert all(torch.equal(same.deltas[n].values, d.values) for n, d in adapter.deltas.items())
    handle.restore_base()
    handle.remove()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
        assert p.requires_grad == flags[n]
        assert p.grad is None
    # Hooks are gone: a new backward gives dense gradients again.
    model(**_batch()).loss.backward()
    name = next(iter(masks))
    grad = params[name].grad.reshape(-1)
    outside = torch.ones_like(grad, dtype=torch.bool)
    outside[masks[name]] = False
    assert bool((grad[outside] != 0).any())


def test_hf_trainer_becomes_shira_with_one_call(tiny_llama, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama(seed=4)
    masks = _masks(model, density=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    attach_gradient_masks(model, masks)
    data = [{k: v[0] for k, v in _batch(s, n=1).items()} for s in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    changed = _changed(before, model)
    assert sum(idx.numel() for idx in changed.values()) > 0
    for n, idx in changed.items():
        allowed = masks.get(n, torch.empty(0, dtype=torch.int64))
        assert bool(torch.isin(idx, allowed).all()), f"Trainer changed {n} outside the mask"
