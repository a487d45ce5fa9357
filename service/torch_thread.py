"""Where torch work runs: the engine worker is the one long-lived thread that runs parallel CPU ops; any other
torch work (loading the model, checking an upload, decoding an adapter) runs on a fresh thread that then exits.

Why: OpenMP (libgomp) gives every thread that starts a parallel region a pool of its own, and while the pooled
threads outnumber the cores it stops spinning between regions, so each of the worker's many small ops pays a
wake-up. One idle long-lived second pool (asyncio.to_thread's executor, say) made decode steps ~30% slower and
the sparse guest corrections ~2x slower on 2 cores. A thread that exits takes its pool with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
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
