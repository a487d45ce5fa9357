"""The serving engine: one base model, many SHiRA adapters, requests batched per adapter set.

A single worker thread owns the model. The asyncio side resolves adapter versions, warms the adapter cache
and queues the request; the worker takes one group at a time from the scheduler, switches the weights to
that group's set (a cached ScatterPlan, so a switch is one scatter), and decodes the whole group as a batch.
Switching and forward passes run on the same thread, one after the other, so no forward pass ever sees a
half-applied set.

Dependencies point down, and nothing below calls back up:

    service/api (HTTP)  ->  engine  ->  engine_worker  ->  mixed_batches, batch_generation  ->  merged_set
                               |              |                       |                          |
                          validation,    scheduler,           shira_core.batched        shira_core.switcher
                          known_records  adapter_cache
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch

from shira_core.decode import DecodeStep, use_decode_linears
from shira_core.decode import load as load_decode_kernel
from shira_core.delta import SparseAdapter
from shira_core.errors import AdapterFormatError, ShiraError
from shira_core.fingerprint import BaseFingerprint
from shira_core.io import adapter_from_bytes
from shira_core.switcher import Switcher

from . import metrics, validation
from .adapter_cache import AdapterCache
from .batch_generation import BatchGenerator
from .config import Settings
from .engine_worker import Worker
from .errors import (
    EngineUnavailableError,
    InvalidAdapterError,
    InvalidRequestError,
    MalformedUploadError,
)
from .known_records import KnownRecords
from .scheduler import Scheduler
from .startup import StartupPhases
from .torch_thread import available_cpus, run_torch
from .types import AdapterSet, GenerationRequest, GenerationResult, Pending, ResolvedSet, resolved_set

log = logging.getLogger(__name__)


class Engine:
    """Serves generation requests for a base model plus any set of stored adapters.

    Args:
        settings: service settings (model, device, dtype, limits, cache budget, batching).
        registry: a RedisRegistry (record/read/listen).
        model, tokenizer: an already loaded model and tokenizer (tests); loaded from settings when None.
        model_label: a display name for an injected model.
    """

    def __init__(self, settings: Settings, registry: Any, model: Any = None, tokenizer: Any = None,
                 model_label: str | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.model = model
        self.tokenizer = tokenizer
        self.model_label = model_label or ("injected model" if model is not None else settings.base_model)
        self.fingerprint: BaseFingerprint | None = None
        self.device = torch.device("cpu")
        self.threads = torch.get_num_threads()
        self.switcher: Switcher | None = None
        self.cache: AdapterCache | None = None
        self.scheduler = Scheduler(settings.max_batch_size, settings.max_groups_waited, settings.max_queue)
        self._worker: Worker | None = None
        self._stop = threading.Event()
        self._listener = None
        self.records: KnownRecords | None = None  # made with the cache, at start

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Loads the model (unless injected), binds the Switcher, starts the worker and the event listener.
        Each phase's seconds are logged at INFO (`shira bench startup` reads them)."""
        if self._worker is not None and self._worker.is_alive():
            return
        phases = StartupPhases()
        self.threads = self.settings.threads or available_cpus()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        if self.model is None:
            from shira_core.models import load_base, pick_device, pick_serving_dtype

            dtype, why = pick_serving_dtype(self.settings.dtype, pick_device(self.settings.device))
            dtype_name = str(dtype).removeprefix("torch.")
            log.info("serving in %s (%s)", dtype_name, why)
            self.model, self.tokenizer, source = load_base(
                self.settings.base_model, self.settings.device, dtype_name,
                self.settings.converted_models_dir()
            )
            self.model_label = source.label
            phases.done("model")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = next(self.model.parameters()).device
        if self.switcher is None:
            self.fingerprint = BaseFingerprint.of(self.model)
            phases.done("fingerprint")
            self.switcher = Switcher(self.model)
            self.cache = AdapterCache(self.registry, self.fingerprint, self.settings.cache_bytes)
            self.records = KnownRecords(self.registry, self.cache.has_adapter, self.cache.drop_names)
            phases.done("switcher")
        step, decode = None, "torch"
        if self.settings.decode_kernel == "native" and use_decode_linears(self.model):
            step = DecodeStep.for_model(self.model)
            decode = f"native {load_decode_kernel().isa()}" + (" + step" if step is not None else "")
        metrics.MODEL.info({"model": self.model_label, "device": str(self.device), "decode": decode,
                            "dtype": str(self.model.dtype).removeprefix("torch.")})
        self._stop.clear()
        generator = BatchGenerator(self.model, self.tokenizer, decode_step=step)
        self._worker = Worker(self.scheduler, self.switcher, self.cache, generator, self.settings, self._stop)
        phases.done("worker")
        self._worker.start()
        self._listener = self.registry.listen(self.records.on_event, self._stop)
        phases.done("listener")
        phases.log("engine")

    def stop(self) -> None:
        """Stops the worker after its current batch; queued requests fail with a 503."""
        self._stop.set()
        with self.scheduler.changed:
            self.scheduler.changed.notify_all()
        if self._worker is not None:
            self._worker.join(60)
            self._worker.fail_queued()
        if self._listener is not None:
            self._listener.join(5)

    def ready(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    # -- requests ------------------------------------------------------------------------------------

    def encode(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]:
        """Tokenises a plain prompt, or chat messages through the chat template with a generation prompt."""
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("give exactly one of 'prompt' or 'messages'")
        if messages is not None:
            if not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            ):
                raise InvalidRequestError("'messages' must be a non-empty list of {role, content} strings")
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        else:
            ids = self.tokenizer(prompt).input_ids
        validation.check_prompt(ids, self.settings.max_prompt_tokens)
        return list(ids)

    def validate_upload(self, data: bytes, name: str) -> SparseAdapter:
        """Native adapter bytes to a SparseAdapter checked against this base model."""
        try:
            return adapter_from_bytes(data, base=self.fingerprint, name=name)
        except AdapterFormatError as e:
            raise MalformedUploadError(f"adapter {name!r}: {e}") from e
        except ShiraError as e:
            raise InvalidAdapterError(f"adapter {name!r}: {e}") from e
        except Exception as e:  # the parser is fuzzed to raise only its own errors; an upload never gets a 500
            log.exception("parsing adapter %r raised unexpectedly", name)
            raise MalformedUploadError(f"adapter {name!r} could not be parsed ({type(e).__name__}: {e})") from e

    async def resolve(self, adapters: AdapterSet) -> AdapterSet:
        """Pins every adapter to a version (the latest when none is given); AdapterNotFoundError otherwise."""
        return (await self.resolve_set(adapters)).pinned

    async def resolve_set(self, adapters: AdapterSet) -> ResolvedSet:
        """The set with its registry records; hand it to the request (`resolved`) so it is read only once."""
        validation.check_set(adapters, self.settings.max_adapters_per_request)
        if adapters.is_base:
            return resolved_set(adapters, [])
        # One thread for all the set's reads: each wake-up of a thread preempts a decoding torch thread.
        records = await asyncio.to_thread(lambda: [self.records.record(r.name, r.version) for r in adapters.refs])
        return resolved_set(adapters, records)

    def _check_request(self, request: GenerationRequest) -> None:
        """The request's limits (service.validation, the same rules the HTTP layer applies) and what only this
        model decides: token ids in its vocabulary, and the context window."""
        p = request.params
        validation.check_prompt(request.prompt_ids, self.settings.max_prompt_tokens)
        validation.check_sampling(p, self.settings.max_new_tokens)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise InvalidRequestError(f"prompt token ids must be in 0..{vocab - 1}")
        window = getattr(self.model.config, "max_position_embeddings", None)
        if window and len(request.prompt_ids) + p.max_new_tokens > window:
            raise InvalidRequestError(
                f"prompt ({len(request.prompt_ids)}) plus max_new_tokens ({p.max_new_tokens}) exceeds the "
                f"model's context of {window} tokens"
            )

    async def _submit(self, request: GenerationRequest, stream: bool) -> Pending:
        if not self.ready():
            raise EngineUnavailableError("the engine is not running (starting or stopped); retry in a moment")
        self._check_request(request)
        rset = request.resolved
        if rset is None or rset.pinned != request.adapters:
            rset = await self.resolve_set(request.adapters)
        # Decode missing adapters off the worker thread, so the worker never waits on Redis; on a thread that
        # exits afterwards, so no second OpenMP pool outlives it (see service.torch_thread). Hits need no thread.
        missing = [rec for rec, _ in rset.items if not self.cache.touch_adapter(rec)]
        await asyncio.gather(*(run_torch(self.cache.adapter, rec) for rec in missing))
        if rset.items and ("plan", rset.key) not in self.cache:
            await self._check_servable(rset)
        pending = Pending(request, rset, asyncio.get_running_loop(), stream)
        pending.ticket = self.scheduler.submit(rset.key, pending)
        metrics.QUEUE_DEPTH.set(self.scheduler.depth)
        return pending

    async def _check_servable(self, rset: ResolvedSet) -> None:
        """Builds the set's ScatterPlan before queuing, so a set that cannot be served (a weighted sum that
        overflows, a weight the engine does not switch) is this request's 422 and never reaches a batch."""
        try:
            await run_torch(self._worker.plan_of, rset.key, rset)
        except ShiraError as e:
            raise InvalidAdapterError(f"adapter set {rset.label} cannot be served: {e}") from e

    def _abandon(self, pending: Pending) -> None:
        if not pending.finished:
            pending.cancelled = True
            if self.scheduler.cancel(pending.ticket):
                metrics.QUEUE_DEPTH.set(self.scheduler.depth)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Runs one request to completion. Cancelling the awaiting task takes it out of its batch."""
        pending = await self._submit(request, stream=False)
        try:
            while True:
                item = await pending.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, GenerationResult):
                    return item
        finally:
            self._abandon(pending)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[str | GenerationResult]:
        """Yields text deltas as they are decoded, then exactly one GenerationResult."""
        pending = await self._submit(request, stream=True)
        try:
            while True:
                item = await pending.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            self._abandon(pending)

    def status(self) -> dict:
        """Active set, queue, cache and switcher memory, for the health/status endpoint."""
        worker = self._worker
        metrics_sample = worker.sample_memory() if worker else {}
        return {
            "model": self.model_label,
            "device": str(self.device),
            "dtype": str(self.model.dtype).removeprefix("torch.") if self.model is not None else None,
            "ready": self.ready(),
            "active": worker.merged.label if worker else "base",
            "queue_depth": self.scheduler.depth,
            "queued_by_set": self.scheduler.snapshot(),
            "cache": self.cache.stats() if self.cache else {},
            "switcher": self.switcher.memory() if self.switcher else {},
            "memory": metrics_sample,
            "batches": worker.batches if worker else 0,
            "switches": dict(worker.merged.switches) if worker else {},
        }

