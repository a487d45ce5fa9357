"""The engine's worker thread: takes a group from the scheduler, switches the weights, decodes the batch.

Everything that touches the model runs here, one step after another. The asyncio side talks to it only
through the scheduler (requests in) and each request's asyncio.Queue (text, result or error out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import psutil
import torch

from shira_core.batched import PackedDelta, RowCorrector, UnbatchableSetError
from shira_core.errors import ShiraError
from shira_core.fusion import fuse_ties
from shira_core.switcher import ScatterPlan, Switcher

from . import metrics
from .adapter_cache import AdapterCache
from .batch_generation import BatchGenerator, Row
from .config import Settings
from .errors import EngineUnavailableError, GenerationFailedError, InvalidAdapterError, ServiceError
from .merged_set import MergedSet
from .mixed_batches import MixedBatches
from .scheduler import Scheduler
from .types import BASE_KEY, GenerationResult, Pending, ResolvedSet, Timings

log = logging.getLogger(__name__)

def request_error(error: BaseException, label: str) -> ServiceError:
    """What a client is told when serving its request raised: a set that cannot be served is its own 422,
    anything unexpected a 500 that names the set (the log has the traceback)."""
    if isinstance(error, ServiceError):
        return error
    if isinstance(error, ShiraError):
        return InvalidAdapterError(f"adapter set {label} cannot be served: {error}")
    return GenerationFailedError(
        f"generation failed for adapter set {label} ({type(error).__name__}); the server log has the details, "
        "and other requests were not affected"
    )


class Worker(threading.Thread):
    """The thread that owns the model. Start it once; set `stop` to end it after the current batch."""

    def __init__(self, scheduler: Scheduler, switcher: Switcher, cache: AdapterCache,
                 generator: BatchGenerator, settings: Settings, stop: threading.Event) -> None:
        super().__init__(name="shira-engine", daemon=True)
        self.scheduler, self.switcher, self.cache = scheduler, switcher, cache
        self.generator, self.settings, self.stop = generator, settings, stop
        self.merged = MergedSet(switcher, cache)
        self.batches = 0
        self._process = psutil.Process()
        self.mixed: MixedBatches | None = None
        if settings.mixed_batches:
            corrector = RowCorrector(generator.model, switcher, native=settings.correction_kernel == "native")
            log.info("mixed batches: rows corrected by %s", "the native kernel" if corrector.native
                     else "PyTorch's sparse products")
            dense = sum(layer.out_features * layer.in_features for layer in corrector.layers)
            self.mixed = MixedBatches(corrector, self.merged, dense, settings.correction_plan_bytes)

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                if not self.scheduler.wait(0.1):
                    continue
                picked = self.scheduler.next_batch(self.merged.key)
                if picked is None:
                    continue
                key, tickets = picked
                pendings = [t.item for t in tickets]  # grown in place as requests join, so all get answered
                try:
                    if self._mixable(key, pendings[0].rset):
                        self._serve_mixed(pendings)
                    else:
                        self._serve(key, pendings)
                except Exception as e:  # never let one bad batch end the worker, or leave a request waiting
                    log.exception("batch for %s failed", key)
                    for p in pendings:
                        if not p.finished:
                            p.fail(request_error(e, p.rset.label))
        finally:
            if self.mixed is not None:
                self.mixed.corrector.close()  # a restarted engine wraps the layers anew

    def _mixable(self, key: tuple, rset: ResolvedSet) -> bool:
        """Whether rows of this set may share a batch with other sets: the first time, its scatter plan and
        delta are built and handed to MixedBatches. A set whose delta cannot even be built fails its queued
        requests (it could not run alone either) and the error is raised."""
        if self.mixed is None:
            return False
        known = self.mixed.known(key)
        if known is not None:
            return known
        try:
            plan = self.plan_of(key, rset)
            delta = self._delta(key, rset, plan)
        except UnbatchableSetError as e:
            self.mixed.refuse(key, e)
            return False
        except Exception as e:
            log.exception("adapter set %s cannot be served", rset.label)
            for ticket in self.scheduler.take(key, self.scheduler.depth_of(key)):
                ticket.item.fail(request_error(e, rset.label))
            metrics.QUEUE_DEPTH.set(self.scheduler.depth)
            raise
        return self.mixed.add(key, plan, delta)

    def fail_queued(self) -> None:
        """Fails every request still queued (at shutdown)."""
        error = EngineUnavailableError("the server is shutting down; retry against another instance")
        while (picked := self.scheduler.next_batch()) is not None:
            for ticket in picked[1]:
                ticket.item.fail(error)
        metrics.QUEUE_DEPTH.set(0)

    def _serve(self, key: tuple, pendings: list[Pending]) -> None:
        cap = self.settings.max_batch_size
        if self.settings.batch_wait_ms > 0 and len(pendings) < cap:
            time.sleep(self.settings.batch_wait_ms / 1000)  # let requests arriving together share the batch
            pendings += [t.item for t in self.scheduler.take(key, cap - len(pendings))]
        live = self._live(pendings)
        if not live:
            return
        try:
            switch_s = self._switch(key, live[0].rset)
        except Exception as e:
            log.exception("switching to %s failed", live[0].rset.label)
            for p in live:
                p.fail(request_error(e, p.rset.label))
            return

        def joiners(room: int, running: list[tuple]) -> list:
            # Join the running batch only while no other set is waiting, so joining never delays a switch.
            if self.scheduler.depth != self.scheduler.depth_of(key):
                return []
            return self.scheduler.take(key, room)

        self._run_batch(live, switch_s, joiners, corrections=None, label=live[0].rset.label)

    def _serve_mixed(self, pendings: list[Pending]) -> None:
        """One batch of rows of any mixable sets; requests of mixable sets join between steps."""
        cap = self.settings.max_batch_size
        if self.settings.batch_wait_ms > 0 and len(pendings) < cap:
            time.sleep(self.settings.batch_wait_ms / 1000)
        keys = self._mixable_keys()
        if keys:
            admits = self._plan_room([p.rset.key for p in pendings])
            pendings += [t.item for t in self.scheduler.take_oldest(keys, cap - len(pendings), admits)]
        live = self._live(pendings)
        if not live:
            return

        def joiners(room: int, running: list[tuple]) -> list:
            # A queued set that cannot mix waits for this batch to drain, so joining never starves it.
            keys = self._mixable_keys()
            return self.scheduler.take_oldest(keys, room, self._plan_room(running)) if keys else []

        try:
            self._run_batch(live, 0.0, joiners, corrections=self.mixed, label="mixed")
        finally:
            self.mixed.release()

    def _plan_room(self, running: list[tuple]) -> Callable[[tuple], bool]:
        """admits(key) for take_oldest: True, and the row counted, while the batch's decode plan stays in budget."""
        rows = list(running)

        def admits(key: tuple) -> bool:
            if not self.mixed.fits([*rows, key]):
                return False
            rows.append(key)
            return True

        return admits

    def _live(self, pendings: list[Pending]) -> list[Pending]:
        metrics.QUEUE_DEPTH.set(self.scheduler.depth)
        return [p for p in pendings if not p.cancelled]

    def _run_batch(self, live: list[Pending], switch_s: float, joiners: Callable[[int, list[tuple]], list],
                   corrections: MixedBatches | None, label: str) -> None:
        """Decodes `live` as one batch; `joiners(room, running)` hands over queued tickets that may join between
        steps (`running`: the set keys of the rows still decoding)."""
        start = time.monotonic()
        members: list[tuple[Row, Pending]] = [(self._row(p, start, switch_s), p) for p in live]

        def admit(room: int) -> list[Row]:
            if self.stop.is_set() or self.scheduler.depth == 0:
                return []
            now = time.monotonic()
            running = [r.set_key for r, _ in members if r.finish_reason is None]
            try:
                tickets = joiners(room, running)
            except Exception:  # a queued set that breaks while being checked fails alone (see _mixable)
                log.exception("admitting joiners failed; the running batch goes on without them")
                return []
            joined = [(self._row(t.item, now, 0.0), t.item) for t in tickets]
            joined = [(r, p) for r, p in joined if not p.cancelled]
            members.extend(joined)
            metrics.QUEUE_DEPTH.set(self.scheduler.depth)
            return [r for r, _ in joined]

        metrics.BATCH_SIZE.observe(len(members))
        try:
            rows = [r for r, _ in members]
            produced = self.generator.run(rows, admit=admit, max_rows=self.settings.max_batch_size,
                                         corrections=corrections)
        except Exception as e:
            log.exception("generation failed for %s", label)
            for _, p in members:
                if not p.finished:
                    p.fail(request_error(e, p.rset.label))
            return
        finally:
            self.batches += 1
            metrics.GENERATE_SECONDS.observe(time.monotonic() - start)
            self.sample_memory()
        metrics.GENERATED_TOKENS.inc(produced)

    def _mixable_keys(self) -> set[tuple] | None:
        """Keys of the queued groups, or None when one of them cannot share a batch with other sets."""
        keys = set()
        for key, pending in self.scheduler.heads():
            try:
                if not self._mixable(key, pending.rset):
                    return None
            except Exception:  # its requests have failed; the other sets go on
                continue
            keys.add(key)
        return keys

    def _delta(self, key: tuple, rset: ResolvedSet, plan: ScatterPlan) -> PackedDelta:
        def build() -> tuple[PackedDelta, int]:
            delta = self.mixed.corrector.delta(plan)
            return delta, delta.nbytes

        return self.cache.get(("packed", key), build, names=rset.names)

    def plan_of(self, key: tuple, rset: ResolvedSet) -> ScatterPlan:
        """The set's ScatterPlan, from the cache or built (any thread: the Switcher locks its reads)."""
        return self.cache.get(("plan", key), lambda: self._plan(rset), names=rset.names)

    def _row(self, p: Pending, start: float, switch_s: float) -> Row:
        queue_s = start - p.enqueued
        metrics.QUEUE_SECONDS.observe(queue_s)
        clock = self.merged.clock  # mixed batches switch the merged set mid-batch; those count too

        def done(row: Row) -> None:
            p.finished = True
            if row.error is not None:
                p.fail(request_error(row.error, p.rset.label))
                return
            if row.finish_reason == "cancelled":
                return
            switched = switch_s + self.merged.clock - clock
            timings = Timings(queue_s * 1000, switched * 1000, (time.monotonic() - start) * 1000)
            p.put(GenerationResult(row.text, len(row.prompt_ids), len(row.tokens), row.finish_reason or "stop",
                                   p.rset.used(), timings))

        return Row(list(p.request.prompt_ids), p.request.params, on_text=p.put if p.stream else None,
                   on_done=done, cancelled=lambda: p.cancelled, set_key=p.rset.key)

    def _switch(self, key: tuple, rset: ResolvedSet) -> float:
        return self.merged.switch(key, None if key == BASE_KEY else self.plan_of(key, rset))

    def _plan(self, rset: ResolvedSet) -> tuple[ScatterPlan, int]:
        items = [(self.cache.adapter(rec), weight) for rec, weight in rset.items]
        if rset.combination == "ties":
            fused = fuse_ties(items, name=rset.label)
            plan = self.switcher.prepare([(fused, 1.0)], label=rset.label)
        else:
            plan = self.switcher.prepare(items, label=rset.label)
        return plan, plan.nbytes

    def sample_memory(self) -> dict[str, int]:
        """Resident and GPU memory into the gauges; returns them too."""
        out = {"resident_bytes": self._process.memory_info().rss}
        metrics.RESIDENT_BYTES.set(out["resident_bytes"])
        device = self.generator.device
        if device.type == "cuda":
            out["gpu_allocated_bytes"] = torch.cuda.memory_allocated(device)
            out["gpu_reserved_bytes"] = torch.cuda.memory_reserved(device)
            metrics.GPU_ALLOCATED_BYTES.set(out["gpu_allocated_bytes"])
            metrics.GPU_RESERVED_BYTES.set(out["gpu_reserved_bytes"])
        return out
