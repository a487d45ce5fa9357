"""The native row-correction kernel: its sums against dense products, its layout, and a machine that cannot build
it still serves mixed batches."""

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
from shira_core.batched.deltas import GROUP, LANES, PIECE, WINDOW, grouped
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
    assert all(d.groups is None for d in delta.layers.values())  # no copy in the kernel's layout
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


def _layer(n_out: int, n_in: int, seed: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A delta with rows of every length: 2% random entries, two full rows (cut into pieces) and a full column."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=gen) < 0.02
    mask[[5, 130]] = True
    mask[:, 7] = True
    dense = torch.where(mask, torch.randn(n_out, n_in, generator=gen), torch.zeros(()))
    row, col = mask.nonzero(as_tuple=True)
    return dense, grouped(row, col, dense[row, col], (n_out, n_in))


def _plan(layers: list[tuple[torch.Tensor, ...]], rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    terms = torch.tensor([[[t.data_ptr() for t in arrays]] for arrays in layers], dtype=torch.int64)
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + len(r))
    return terms, torch.tensor(offsets + [r for rs in rows for r in rs], dtype=torch.int64)


def test_the_layout_cuts_long_rows_and_pads_little():
    kernel = correction_kernel.load()
    assert kernel is None or (kernel.window, kernel.group, kernel.lanes) == (WINDOW, GROUP, LANES)  # they agree
    dense, (windows, start, lane, col, values) = _layer(200, 100, seed=1)
    entries = int((dense != 0).sum())
    assert len(windows) == 5 and int(start[-1]) == len(col) == len(values)  # 200 rows: three full windows and 8
    assert start.diff().remainder(GROUP).eq(0).all()
    widths = start.diff() // GROUP
    assert int(widths.max()) == PIECE  # a full row of 100 runs as pieces of 32, 32, 32 and 4
    assert entries <= len(values) < 1.3 * entries
    assert set(lane.tolist()) <= set(range(WINDOW + 1))


@needs_kernel
@pytest.mark.parametrize("tokens", [1, 11, 1500])  # 1500: buffers past what a thread keeps between calls
def test_corrections_equal_dense_products_and_a_row_never_depends_on_its_batchmates(tokens):
    kernel = correction_kernel.load()
    (d0, g0), (d1, g1) = _layer(200, 100, seed=2), _layer(200, 100, seed=3)
    carriers = [[0, 2, 3, 4, 5, 6, 7, 8, 9, 10], [2, 9]]  # ten rows: two chunks of eight lanes at one token a row
    terms, rows = _plan([g0, g1], carriers)
    x = torch.randn(12, tokens, 100, generator=torch.Generator().manual_seed(4))
    x[1, 0, 3] = x[11, 0, 3] = float("inf")  # rows no term corrects: their lanes never run, their outputs stay
    out = torch.randn(12, tokens, 200, generator=torch.Generator().manual_seed(5))
    expected = out.clone()
    for delta, rs in ((d0, carriers[0]), (d1, carriers[1])):
        expected[rs] += x[rs] @ delta.t()
    got = out.clone()
    kernel.correct(terms, rows, 0, x, got)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[[1, 11]], out[[1, 11]])
    alone = out[2:3].clone()  # row 2 in a batch of its own: the same bits
    kernel.correct(*_plan([g0, g1], [[0], [0]]), 0, x[2:3], alone)
    assert torch.equal(alone, got[2:3])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_rows_sum_in_fp32_and_round_once(dtype):
    kernel = correction_kernel.load()
    (d0, g0), (d1, g1) = _layer(200, 100, seed=6), _layer(200, 100, seed=7)
    x = torch.randn(3, 100, generator=torch.Generator().manual_seed(8)).to(dtype)
    out = torch.randn(3, 200, generator=torch.Generator().manual_seed(9)).to(dtype)
    got = out.clone()
    kernel.correct(*_plan([g0, g1], [[0, 2], [0]]), 0, x, got)
    sums = torch.zeros(3, 200, dtype=torch.float64)
    sums[[0, 2]] += x[[0, 2]].double() @ d0.double().t()
    sums[0] += x[0].double() @ d1.double().t()
    expected = (out.double() + sums).to(dtype)  # one rounding of the exact sum
    assert torch.equal(got[1], out[1])
    assert (got.float() - expected.float()).abs().le(expected.float().abs() * 2**-7 + 1e-3).all()  # an ulp at most
    assert (got == expected).float().mean() > 0.98  # rounded once: nearly always the exact sum's rounding
