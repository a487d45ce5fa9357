"""train_adapter end to end on a tiny model: it learns, is reproducible, and leaves the base as found."""

from __future__ import annotations

import pytest
import torch

from shira_core.fingerprint import BaseFingerprint
from shira_core.models import linear_weight_names
from shira_core.training import TrainConfig, TrainingConfigError, masks_for, parse_jsonl, train_adapter
from shira_core.training.data import examples_to_jsonl

from .training_support import char_tokenizer, demo_examples, demo_llama, records


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def data():
    return parse_jsonl(examples_to_jsonl(records(32, seed=0))), parse_jsonl(examples_to_jsonl(records(8, seed=1)))


def _model(tiny_llama):
    return tiny_llama(seed=0, vocab=128)


@pytest.mark.parametrize("method", ["sparse", "gradmask"])
def test_learns_reproducibly_and_restores_the_base(tiny_llama, tok, data, method):
    train, held = data
    model = _model(tiny_llama)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(method=method, mask="wm", density=0.1, epochs=3, lr=5e-2, batch_size=8, max_len=48,
                      eval_limit=4, eval_before=True)
    lines: list[str] = []
    result = train_adapter(model, tok, train, held, cfg, name="rev", progress=False, log=lines.append)
    assert [s.epoch for s in result.history] == [0, 1, 2, 3]
    assert result.steps == 12
    base_eval, last = result.history[0].eval, result.history[-1].eval
    assert last.loss < base_eval.loss - 0.1  # it learned something
    assert result.history[3].train_loss < result.history[1].train_loss
    assert 0.0 <= last.accuracy <= 1.0 and last.examples == 4 and len(last.samples) == 3
    assert len(lines) == 4 and "eval loss" in lines[-1]
    adapter = result.adapter
    assert adapter.mask == "wm" and adapter.extra["method"] == method
    assert adapter.density == pytest.approx(0.1, rel=0.05)
    adapter.validate()
    BaseFingerprint.of(model).check(adapter)  # fingerprint of the untrained base
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} was not restored"
        assert p.grad is None
    assert not model.training

    again = train_adapter(_model(tiny_llama), tok, train, held, cfg, name="rev", progress=False)
    for name, d in adapter.deltas.items():
        assert torch.equal(d.values, again.adapter.deltas[name].values), f"{name} differs between seeded runs"


def test_grad_mask_kind_runs_calibration(tiny_llama, tok, data):
    train, _ = data
    cfg = TrainConfig(mask="snip", density=0.05, epochs=1, lr=1e-2, max_len=48, calib_batches=2, max_steps=2)
    result = train_adapter(_model(tiny_llama), tok, train, None, cfg, progress=False)
    assert result.steps == 2 and result.adapter.mask == "snip" and result.history[0].eval is None
    other = train_adapter(_model(tiny_llama), tok, train, None, TrainConfig(**{**vars(cfg), "mask": "wm"}),
                          progress=False)
    name = next(iter(result.adapter.deltas))
    assert not torch.equal(result.adapter.deltas[name].indices, other.adapter.deltas[name].indices)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [("method", "lora", "unknown method"), ("mask", "top", "unknown mask"), ("density", 0.0, "density"),
     ("epochs", 0, "epochs"), ("lr", -1.0, "lr must be positive")],
)
def test_bad_options_are_refused_before_anything_runs(tiny_llama, tok, data, field, value, message):
    model = _model(tiny_llama)
    cfg = TrainConfig(**{field: value})
    with pytest.raises(TrainingConfigError, match=message):
        train_adapter(model, tok, data[0], None, cfg, progress=False)
    assert all(not hasattr(m, "forward") or "forward" not in vars(m) for m in model.modules())


def test_train_masked_matches_train_adapter_on_the_same_mask(tok):
    model = demo_llama()
    train = demo_examples("sentiment")
    cfg = TrainConfig(method="sparse", mask="wm", density=0.1, epochs=2, lr=1e-2, batch_size=4, max_len=64,
                      max_steps=6)
    reference = train_adapter(model, tok, train, None, cfg, name="ref", progress=False).adapter
    masks = masks_for(model, "wm", 0.1, linear_weight_names(model))
    mine = train_adapter(model, tok, train, None, cfg, name="mine", progress=False, masks=masks).adapter
    assert mine.deltas.keys() == reference.deltas.keys()
    for name, d in reference.deltas.items():
        assert torch.equal(d.indices, mine.deltas[name].indices)
        assert torch.equal(d.values, mine.deltas[name].values), f"{name} trained differently"
    assert mine.extra["steps"] == "6"
