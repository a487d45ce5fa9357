"""Where torch runs: run_torch's threads are gone once the call returns; the engine sizes torch's thread pool."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from service.torch_thread import available_cpus, cpu_quota, run_torch


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


@pytest.mark.parametrize(("cpu_max", "cpus"), [("max 100000", None), ("200000 100000", 2), ("150000 100000", 2),
                                                ("50000 100000", 1)])
def test_cgroup_quota_is_read_and_rounded_up(cpu_max, cpus):
    assert cpu_quota(cpu_max) == cpus


def test_available_cpus_never_exceeds_the_affinity_mask():
    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))


def test_the_engine_sets_torch_threads_from_settings(tokenizer, registry):
    from support import tiny_model

    from service.config import Settings
    from service.engine import Engine

    before = torch.get_num_threads()
    engine = Engine(Settings(_env_file=None, threads=1), registry, model=tiny_model(len(tokenizer)),
                    tokenizer=tokenizer)
    try:
        engine.start()
        assert torch.get_num_threads() == 1 and engine.threads == 1
    finally:
        engine.stop()
        torch.set_num_threads(before)
    default = Engine(Settings(_env_file=None), registry, model=tiny_model(len(tokenizer)), tokenizer=tokenizer)
    try:
        default.start()
        assert default.threads == available_cpus() == torch.get_num_threads()
    finally:
        default.stop()
        torch.set_num_threads(before)
