"""Where torch work runs: the engine worker is the one long-lived thread that runs parallel CPU ops; any other
torch work (loading the model, checking an upload, decoding an adapter) runs on a fresh thread that then exits.

Why: OpenMP (libgomp) gives every thread that starts a parallel region a pool of its own, and while the pooled
threads outnumber the cores it stops spinning between regions, so each of the worker's many small ops pays a
wake-up. One idle long-lived second pool (asyncio.to_thread's executor, say) made decode steps ~30% slower and
the sparse row corrections ~2x slower on 2 cores. A thread that exits takes its pool with it.

For the same reason the pool is sized to the CPUs this process may use, not the machine's cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


async def run_torch(fn: Callable[..., T], *args) -> T:
    """Awaits fn(*args) run on a new thread that exits afterwards (asyncio.to_thread keeps its threads)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(ok: bool, value) -> None:
        if not future.done():
            (future.set_result if ok else future.set_exception)(value)

    def target() -> None:
        try:
            outcome = (True, fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed back to the awaiting task
            outcome = (False, e)
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name="shira-torch", daemon=True).start()
    return await future


def cpu_quota(cpu_max: str) -> int | None:
    """CPUs allowed by a cgroup v2 `cpu.max` line ("200000 100000" -> 2, rounded up); None when unlimited."""
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    return max(1, math.ceil(int(parts[0]) / int(parts[1])))


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers, k8s limits).

    torch's default counts the machine's cores, so replicas sharing a node each start one thread per core
    and oversubscribe it.
    """
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quotas = (("/sys/fs/cgroup/cpu.max", cpu_quota), ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", _cgroup_v1_quota))
    for path, read in quotas:
        with contextlib.suppress(OSError, ValueError):
            quota = read(Path(path).read_text())
            if quota is not None:
                count = min(count, quota)
    return max(1, count)


def _cgroup_v1_quota(quota_us: str) -> int | None:
    quota = int(quota_us)
    if quota <= 0:
        return None
    period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    return max(1, math.ceil(quota / period))
