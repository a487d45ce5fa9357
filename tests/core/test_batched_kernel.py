"""The native decode kernel: it builds here, and a machine that cannot build it still serves mixed batches."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from random_adapters import random_adapter

from shira_core.batched import RowCorrector
from shira_core.batched import kernel as correction_kernel
from shira_core.switcher import Switcher

from .kernel_support import needs_kernel
from .test_batched_corrections import isolated


@needs_kernel
def test_the_kernel_builds_on_this_machine():
    assert correction_kernel.load() is not None  # g++ and ninja are here; `make install` built it


def test_without_a_compiler_load_warns_and_gives_none(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    code = "from shira_core.batched import kernel as correction_kernel; print('kernel:', correction_kernel.load())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kernel: None" in done.stdout
    assert "row-correction kernel unavailable, using PyTorch's sparse products" in done.stderr


def test_without_the_kernel_guest_rows_run_pytorchs_products(tiny_llama, monkeypatch):
    monkeypatch.setattr(correction_kernel, "load", lambda: None)
    model = tiny_llama(seed=3, vocab=64, hidden=32)
    switcher = Switcher(model)
    corrector = RowCorrector(model, switcher)  # native asked for, not available
    assert not corrector.native
    plan = switcher.prepare([(random_adapter(model, "a", 1, std=0.3, mask_seed_step=100), 1.0)])
    delta = corrector.delta(plan)
    assert all(d.blocked is None for d in delta.layers.values())  # no copy in the kernel's layout
    decode = corrector.decode_plan([(delta,), ()])
    assert decode.segments and decode.nbytes > 0  # a block-diagonal copy
    ids = torch.randint(0, 64, (2, 1), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        with corrector.active(decode):
            got = model(input_ids=ids).logits
        switcher.apply(plan)
        expected = model(input_ids=ids[:1]).logits
        switcher.revert()
        base = model(input_ids=ids[1:]).logits
    corrector.close()
    torch.testing.assert_close(got, torch.cat([expected, base]), rtol=1e-4, atol=1e-4)


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """correction_kernel.load() as on a machine without a C++ compiler: torch finds no CXX and no earlier build."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    correction_kernel.load.cache_clear()
    yield
    correction_kernel.load.cache_clear()  # later tests load the real kernel again


def test_with_the_compiler_hidden_native_rows_fall_back_to_the_same_outputs(tiny_llama, no_compiler, caplog):
    with caplog.at_level(logging.WARNING, logger=correction_kernel.__name__):
        assert correction_kernel.load() is None
    assert "row-correction kernel unavailable, using PyTorch's sparse products" in caplog.text
    model = tiny_llama(seed=3, vocab=64, hidden=32)
    switcher = Switcher(model)
    singles = [random_adapter(model, name, seed, std=0.3, mask_seed_step=100) for name, seed in (("a", 1), ("b", 2))]
    plans = [switcher.prepare([(single, 1.0)]) for single in singles]
    sets = [0, None, 1, 0]  # None: a base row
    ids = torch.randint(0, 64, (len(sets), 1), generator=torch.Generator().manual_seed(2))
    got = {}
    for native in (True, False):
        corrector = RowCorrector(model, switcher, native=native)
        assert not corrector.native  # asked for or not, the rows run on PyTorch's products
        deltas = [corrector.delta(p) for p in plans]
        decode = corrector.decode_plan([() if s is None else (deltas[s],) for s in sets])
        with torch.inference_mode(), corrector.active(decode):
            got[native] = model(input_ids=ids).logits
        corrector.close()
    assert torch.equal(got[True], got[False])
    torch.testing.assert_close(got[True], isolated(model, switcher, plans, sets, ids), rtol=1e-4, atol=1e-4)
