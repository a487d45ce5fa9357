"""The native decode kernel: it builds here, and a machine that cannot build it still serves mixed batches."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from shira_core import guest_kernel
from shira_core.guest_rows import GuestRows
from shira_core.switcher import Switcher

from .test_guest_rows import adapter


def test_the_kernel_builds_on_this_machine():
    assert guest_kernel.load() is not None  # g++ and ninja are here; `make install` built it


def test_without_a_compiler_load_warns_and_gives_none(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-g++"), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    code = "from shira_core import guest_kernel; print('kernel:', guest_kernel.load())"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "kernel: None" in done.stdout
    assert "guest-row decode kernel unavailable, using PyTorch's sparse products" in done.stderr


def test_without_the_kernel_guest_rows_run_pytorchs_products(tiny_llama, monkeypatch):
    monkeypatch.setattr(guest_kernel, "load", lambda: None)
    model = tiny_llama(seed=3, vocab=64, hidden=32)
    switcher = Switcher(model)
    guests = GuestRows(model, switcher)  # native asked for, not available
    assert not guests.native
    plan = switcher.prepare([(adapter(model, "a", 1), 1.0)])
    delta = guests.delta(plan)
    assert all(d.blocked is None for d in delta.layers.values())  # no copy in the kernel's layout
    decode = guests.decode_plan([(delta,), ()])
    assert decode.segments and decode.nbytes > 0  # a block-diagonal copy
    ids = torch.randint(0, 64, (2, 1), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        with guests.active(decode):
            got = model(input_ids=ids).logits
        switcher.apply(plan)
        expected = model(input_ids=ids[:1]).logits
        switcher.revert()
        base = model(input_ids=ids[1:]).logits
    guests.close()
    torch.testing.assert_close(got, torch.cat([expected, base]), rtol=1e-4, atol=1e-4)

