"""run_torch: torch work off the event loop on a thread that is gone once the call returns."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from service.torch_thread import run_torch


def test_runs_on_a_thread_that_exits_and_returns_the_value():
    seen: list[threading.Thread] = []

    def work(n: int) -> float:
        seen.append(threading.current_thread())
        return float(torch.ones(n).sum())  # big enough for a parallel region

    assert asyncio.run(run_torch(work, 1_000_000)) == 1_000_000.0
    worker = seen[0]
    assert worker is not threading.main_thread()
    worker.join(5)
    assert not worker.is_alive()


def test_errors_reach_the_awaiting_task():
    def fail() -> None:
        raise ValueError("bad adapter")

    with pytest.raises(ValueError, match="bad adapter"):
        asyncio.run(run_torch(fail))
