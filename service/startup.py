"""Timing the start-up path: each phase's seconds, logged on one INFO line that `shira bench startup` parses."""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("shira.startup")


class StartupPhases:
    """Seconds per phase since the previous one: `done(name)` after each phase, `log(what)` at the end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now

    def log(self, what: str) -> None:
        parts = " ".join(f"{k}={v:.2f}s" for k, v in self.seconds.items())
        log.info("startup phases (%s): %s", what, parts)


def pause_gc() -> None:
    """Start-up makes millions of long-lived objects (torch, transformers, the model), and the cyclic collector
    would walk them again and again for nothing: about 1 s of a 5 s start. Paused until `resume_gc`."""
    gc.disable()


def resume_gc() -> None:
    """Moves what start-up made to the permanent generation, which later collections skip (shorter pauses while
    decoding too), and collects again. A no-op unless `pause_gc` ran."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()
