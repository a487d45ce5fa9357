"""Calibration for the grad and snip masks: sums of |grad| per batch, model left untouched."""

from __future__ import annotations

import pytest
import torch

from shira_core.errors import MaskError
from shira_core.masks import build_masks
from shira_core.models import linear_weight_names
from shira_core.training import collect_gradients, masks_for


def _batches(k: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for s in range(k):
        ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(s))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def _manual(model: torch.nn.Module, batches, names) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(params[n]) for n in names}
    model.train()
    for b in batches:
        model.zero_grad(set_to_none=True)
        model(**b).loss.backward()
        for n in names:
            acc[n] += params[n].grad.abs()
    model.zero_grad(set_to_none=True)
    return acc


def test_gradients_equal_manual_accumulation_and_model_is_untouched(tiny_llama):
    model = tiny_llama(seed=1)
    names = linear_weight_names(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)
    got = collect_gradients(model, iter(_batches(5)), names, num_batches=3)
    assert not model.training and not emb.requires_grad  # eval mode and flags as found
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    emb.requires_grad_(True)
    ref = _manual(model, _batches(3), names)
    assert got.keys() == set(names)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-8, msg=n)
        assert float(got[n].sum()) > 0


@pytest.mark.parametrize("kind", ["grad", "snip"])
def test_masks_for_uses_calibration(tiny_llama, kind):
    model = tiny_llama(seed=2)
    names = linear_weight_names(model)[:4]
    masks = masks_for(model, kind, 0.05, names, calibration=_batches(2), num_batches=2)
    ref_grads = _manual(model, _batches(2), names)
    params = dict(model.named_parameters())
    ref = build_masks({n: params[n].detach() for n in names}, kind, 0.05, grads=ref_grads, names=names)
    for n in names:
        assert torch.equal(masks[n], ref[n]), n


def test_calibration_needs_batches(tiny_llama):
    model = tiny_llama()
    names = linear_weight_names(model)
    with pytest.raises(MaskError, match="no batches"):
        collect_gradients(model, [], names)
    with pytest.raises(MaskError, match="calibration"):
        masks_for(model, "snip", 0.01, names)
    wm = masks_for(model, "wm", 0.01, names)  # magnitude masks need none
    assert wm.keys() == set(names)
