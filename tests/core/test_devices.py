"""The core paths on every device this machine has: CPU always, CUDA too where one is present.

The other core tests run on the CPU in fp32. These repeat the invariants that depend on the device or the
dtype (scatter writes, CSR products, autograd through sparse values) in the dtype each device serves in.
"""

from __future__ import annotations

import pytest
import torch
from random_adapters import random_adapter

from shira_core.batched import RowCorrector
from shira_core.io import adapter_from_bytes, adapter_to_bytes
from shira_core.models import linear_weight_names
from shira_core.switcher import Switcher
from shira_core.training import TrainConfig, parse_jsonl, train_adapter
from shira_core.training.data import examples_to_jsonl

from .conftest import adaptable_names, assert_matches_snapshot, dense_expected, snapshot, unique_weights
from .training_support import char_tokenizer, records

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SERVING = [(d, t) for d in DEVICES for t in (torch.float32, torch.bfloat16)]


def _use(switcher: Switcher, plan) -> None:
    """Applies the plan, or reverts to the base for None."""
    if plan is None:
        switcher.revert()
    else:
        switcher.apply(plan)


def _on(tiny_llama, device: str, dtype: torch.dtype, **kwargs):
    return tiny_llama(seed=5, vocab=64, hidden=32, **kwargs).to(device=device, dtype=dtype)


@pytest.mark.parametrize(("device", "dtype"), SERVING)
def test_apply_transition_and_revert_are_exact_on_the_device(tiny_llama, device, dtype):
    model = _on(tiny_llama, device, dtype)
    snap = snapshot(model)
    base = {n: w.cpu() for n, w in unique_weights(model).items()}
    every = adaptable_names(model)
    a, b = random_adapter(model, "a", 1, every), random_adapter(model, "b", 2, every)
    switcher = Switcher(model)
    for items, step in (([(a, 1.0)], switcher.apply), ([(a, 0.6), (b, 0.4)], switcher.transition)):
        step(items)
        want = dense_expected(model, base, items)
        for name, weight in unique_weights(model).items():
            assert weight.device.type == device
            assert torch.equal(weight.cpu(), want[name]), f"{name} on {device} differs from W0 + sum(alpha delta)"
    switcher.revert()
    assert_matches_snapshot(model, snap)


@pytest.mark.parametrize(("device", "dtype"), SERVING)
def test_guest_rows_give_each_row_its_own_set_on_the_device(tiny_llama, device, dtype):
    model = _on(tiny_llama, device, dtype)
    snap = snapshot(model)
    switcher = Switcher(model)
    corrector = RowCorrector(model, switcher)
    linear = linear_weight_names(model)
    plans = [switcher.prepare([(random_adapter(model, f"s{i}", i + 1, linear, std=0.3), 1.0)]) for i in range(3)]
    sets = [0, None, 1, 2, 0]  # None: a base row
    ids = torch.randint(0, 64, (len(sets), 6), generator=torch.Generator().manual_seed(1)).to(device)

    @torch.inference_mode()
    def logits(x: torch.Tensor) -> torch.Tensor:
        return model(input_ids=x, use_cache=False).logits.float()

    expected = []
    for r, s in enumerate(sets):
        _use(switcher, plans[s] if s is not None else None)
        expected.append(logits(ids[r : r + 1])[0])
    expected = torch.stack(expected)
    switcher.apply(plans[0])  # merged: set 0, so set rows carry d_S - d_0 and base rows carry -d_0
    minus_merged = corrector.delta(plans[0], negate=True)
    rows = [() if s == 0 else ((corrector.delta(plans[s]),) if s is not None else ()) + (minus_merged,) for s in sets]
    with corrector.active(corrector.prefill_plan(rows)):
        mixed = logits(ids)
    with corrector.active(corrector.decode_plan(rows)):
        mixed_last = logits(ids[:, -1:])
    plain = logits(ids)
    switcher.revert()
    alone_last = []
    for r, s in enumerate(sets):
        _use(switcher, plans[s] if s is not None else None)
        alone_last.append(logits(ids[r : r + 1, -1:])[0])
    switcher.revert()
    corrector.close()

    # Summing a correction in the activations' dtype rounds differently from rounding W + d first, so the
    # check is relative: the corrected rows sit far closer to their own sets than the merged set's output does.
    spread = (plain - expected).abs().mean()
    assert spread > 0.05
    assert (mixed - expected).abs().mean() < 0.05 * spread
    assert (mixed_last - torch.stack(alone_last)).abs().mean() < 0.05 * spread
    assert_matches_snapshot(model, snap)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("method", "mask"), [("sparse", "grad"), ("gradmask", "snip"), ("sparse", "struct")])
def test_training_on_the_device_stores_a_cpu_adapter_and_restores_the_base(tiny_llama, device, method, mask):
    model = tiny_llama(seed=0, vocab=128).to(device)
    snap = snapshot(model)
    train = parse_jsonl(examples_to_jsonl(records(16, seed=0)))
    cfg = TrainConfig(method=method, mask=mask, density=0.05, lr=1e-2, batch_size=4, max_len=32, calib_batches=2,
                      max_steps=3)
    adapter = train_adapter(model, char_tokenizer(), train, None, cfg, progress=False).adapter
    assert_matches_snapshot(model, snap)
    assert adapter.nnz > 0 and all(d.values.device.type == "cpu" for d in adapter)
    assert all(bool(d.values.abs().sum() > 0) for d in adapter)  # every layer moved
    again = adapter_from_bytes(adapter_to_bytes(adapter))
    assert again.nnz == adapter.nnz
    Switcher(model).apply([(again, 1.0)])  # the stored adapter loads back onto the device's model
    assert not torch.equal(snapshot(model)[f"param:{next(iter(adapter.deltas))}"],
                           snap[f"param:{next(iter(adapter.deltas))}"])


def test_auto_serves_bf16_only_where_the_cpu_has_it(monkeypatch):
    from shira_core import models

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    assert models.pick_serving_dtype("auto", cpu)[0] == torch.bfloat16
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    dtype, why = models.pick_serving_dtype("auto", cpu)
    assert dtype == torch.float32 and "no native bf16" in why
    assert models.pick_serving_dtype("auto", cuda)[0] == torch.bfloat16
    assert models.pick_serving_dtype("float32", cuda) == (torch.float32, "set by SHIRA_DTYPE")
    assert models.pick_dtype("auto", cpu) == torch.float32  # training and the other tools stay in fp32


def test_native_bf16_is_read_from_the_cpu_flags():
    from pathlib import Path

    from shira_core import models

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert models.cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
