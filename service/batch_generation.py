"""The batched decode loop: many requests for one adapter set, one forward pass per token for all of them.

Rows are left-padded so every row's newest token sits in the last column; each row carries its own
position ids, sampling settings and stop conditions. Finished or cancelled rows leave the batch at once
(their KV-cache rows are dropped), and new rows can join between steps: they are prefilled on their own
and their cache is left-padded to the running one's length before the two are concatenated.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from . import metrics
from .detokenize import Detokenizer
from .row_batch import RowBatch
from .sampling import sample
from .types import SamplingParams

log = logging.getLogger(__name__)

# Temperatures are floored here so that scaling by 1/T stays finite in fp32 (the API refuses T below
# service.protocol's MIN_TEMPERATURE anyway; this guards direct callers).
TEMPERATURE_FLOOR = 1e-4


@dataclass(eq=False)
class Row:
    """One request inside a batch.

    Args:
        prompt_ids: the tokenised prompt (at least one token).
        params: sampling settings; temperature 0 is greedy.
        on_text: called with each complete piece of new text (streaming); None when nobody streams.
        on_done: called once with the row when it finishes, for any reason (`error` is set when it failed).
        cancelled: polled between steps; when it returns True the row leaves the batch.
        set_key: the row's adapter set, for mixed-set batches (rows of one set share their corrections).
    """

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[Row], None] | None = None
    cancelled: Callable[[], bool] = lambda: False
    set_key: Hashable = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    error: BaseException | None = None
    generator: torch.Generator | None = None
    emitted: int = 0  # characters of `text` streamed so far
    prefix_offset: int = 0  # incremental detokenisation offsets into `tokens` (as in vLLM)
    read_offset: int = 0

    @property
    def incremental(self) -> bool:
        return self.on_text is not None or bool(self.params.stop)


class RowCorrections(Protocol):
    """Mixed-set batches: per-row corrections applied during each forward pass (see service.mixed_batches)."""

    def prefill(self, rows: list[Row], running: list[Row]) -> contextlib.AbstractContextManager[Any]: ...

    def decode(self, rows: list[Row]) -> contextlib.AbstractContextManager[Any]: ...


class BatchGenerator:
    """Runs batches of rows through one causal LM. Call only from the thread that owns the model.

    Args:
        model: a Hugging Face causal LM in eval mode.
        tokenizer: its tokenizer (for detokenisation and the pad/eos ids).
        eos_ids: token ids that end a row; default: the tokenizer's and generation config's EOS ids.
        decode_step: runs decode steps in place of the model's forward (shira_core.decode.DecodeStep): called with
            the rows' tokens, positions, attention mask and cache, returns the logits.
    """

    def __init__(self, model, tokenizer, eos_ids: set[int] | None = None,
                 decode_step: Callable[..., torch.Tensor] | None = None) -> None:
        self.model = model
        self.decode_step = decode_step
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if eos_ids is None:
            eos_ids = set()
            for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
                if isinstance(source, int):
                    eos_ids.add(source)
                elif source:
                    eos_ids.update(source)
        self.eos_ids = eos_ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.text = Detokenizer(tokenizer, self.eos_ids)
        # transformers 5 renamed past_key_values to cache; use whichever this version takes.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def run(self, rows: list[Row], admit: Callable[[int], list[Row]] | None = None, max_rows: int = 64,
            corrections: RowCorrections | None = None) -> int:
        """Generates until every row is finished.

        A row whose prefill, step, sampling or callbacks raise ends alone with `error` set; the others go on.

        Args:
            rows: the rows to start with.
            admit: asked between steps for up to n more rows to join the batch (same adapter set, or any set
                `corrections` accepted).
            max_rows: the batch never grows past this many rows.
            corrections: rows of several adapter sets: wraps every forward pass with their corrections.

        Returns:
            Tokens generated, over all rows.
        """
        batch: RowBatch | None = None
        pending = list(rows)
        produced = 0
        while True:
            if pending:
                batch, made = self._join(batch, [r for r in pending if self._start(r)], corrections)
                produced += made
            if batch is None:
                pending = admit(max_rows) if admit else []
                if not pending:
                    return produced
                continue
            batch, made = self._decode(batch, corrections)
            produced += made
            room = max_rows - (len(batch.rows) if batch else 0)
            pending = admit(room) if admit and room > 0 else []

    def _start(self, row: Row) -> bool:
        try:
            self._init_row(row)
        except Exception as e:
            self._fail(row, e)
            self._finish(row)
            return False
        return True

    def _join(self, batch: RowBatch | None, rows: list[Row],
              corrections: RowCorrections | None) -> tuple[RowBatch | None, int]:
        """Prefills `rows` and adds them to the running batch. When a prefill of several rows fails, each is
        prefilled on its own, so only a row that fails alone is dropped."""
        if not rows:
            return batch, 0
        try:
            with corrections.prefill(rows, batch.rows if batch else []) if corrections else contextlib.nullcontext():
                start = time.perf_counter()
                joined, first = self._prefill(rows)
                tokens = first.tolist()  # waits for the device, so the time is the pass's
                metrics.STEP_SECONDS.labels("prefill").observe(time.perf_counter() - start)
        except Exception as e:
            if len(rows) == 1:
                self._fail(rows[0], e)
                self._finish(rows[0])
                return batch, 0
            log.warning("prefill of %d rows failed (%s: %s); prefilling them one at a time", len(rows),
                        type(e).__name__, e)
            produced = 0
            for row in rows:
                batch, made = self._join(batch, [row], corrections)
                produced += made
            return batch, produced
        produced = self._advance(joined, tokens)
        return self._drop_finished(batch.merge(joined) if batch else joined), produced

    def _decode(self, batch: RowBatch, corrections: RowCorrections | None) -> tuple[RowBatch | None, int]:
        """One decode step for every row. When it fails, each row steps on its own, so only a row that fails
        alone is dropped."""
        length = batch.cache.get_seq_length()
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        try:
            tokens = self._step(batch, corrections)
        except Exception as e:
            log.warning("decode step of %d rows failed (%s: %s); stepping them one at a time", len(batch.rows),
                        type(e).__name__, e)
            batch, tokens = self._step_alone(batch, length, corrections)
            if batch is None:
                return None, 0
        batch.positions = batch.positions + 1
        produced = self._advance(batch, tokens)
        return self._drop_finished(batch), produced

    def _step(self, batch: RowBatch, corrections: RowCorrections | None) -> list[int]:
        with corrections.decode(batch.rows) if corrections else contextlib.nullcontext():
            start = time.perf_counter()
            if self.decode_step is not None:
                logits = self.decode_step(batch.last, batch.positions, batch.mask, batch.cache)
            else:
                logits = self.model(
                    input_ids=batch.last[:, None],
                    attention_mask=batch.mask,
                    position_ids=batch.positions[:, None],
                    use_cache=True,
                    **{self._cache_arg: batch.cache},
                ).logits[:, -1]
            batch.last = sample(logits, batch.rows)
            tokens = batch.last.tolist()
            metrics.STEP_SECONDS.labels("decode").observe(time.perf_counter() - start)
        return tokens

    def _step_alone(self, batch: RowBatch, length: int,
                    corrections: RowCorrections | None) -> tuple[RowBatch | None, list[int]]:
        """Steps each row of a batch whose step failed on its own; rows that fail again end with their error."""
        batch.truncate(length)  # layers the failed pass reached hold one token too many
        parts, tokens = [], []
        for i, row in enumerate(batch.rows):
            part = batch.select(slice(i, i + 1), self.model.config)
            try:
                tokens += self._step(part, corrections)
            except Exception as e:
                self._fail(row, e)
                self._finish(row)
                continue
            parts.append(part)
        if not parts:
            return None, []
        return functools.reduce(RowBatch.merge, parts), tokens

    def _fail(self, row: Row, error: BaseException) -> None:
        log.error("a row failed: %s: %s", type(error).__name__, error, exc_info=error)
        row.error, row.finish_reason = error, "error"

    def _init_row(self, row: Row) -> None:
        if not row.prompt_ids:
            raise ValueError("a row needs at least one prompt token")
        if row.params.temperature > 0:
            row.generator = torch.Generator(device=self.device)
            if row.params.seed is not None:
                row.generator.manual_seed(row.params.seed)
            else:
                row.generator.seed()

    def _prefill(self, rows: list[Row]) -> tuple[RowBatch, torch.Tensor]:
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt_ids):] = torch.tensor(row.prompt_ids, dtype=torch.long)
            mask[i, width - len(row.prompt_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp_(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
            **{self._cache_arg: cache},
        ).logits[:, -1]
        first = sample(logits, rows)
        return RowBatch(rows, cache, mask, positions[:, -1] + 1, first), first

    def _advance(self, batch: RowBatch, tokens: list[int]) -> int:
        """Appends each row's new token and settles EOS, length, stop strings and cancellation."""
        for row, token in zip(batch.rows, tokens, strict=True):
            try:
                self._advance_row(row, token)
            except Exception as e:  # a failing stream callback or detokenisation ends only its own row
                self._fail(row, e)
        return len(tokens)

    def _advance_row(self, row: Row, token: int) -> None:
        if row.cancelled():
            row.finish_reason = "cancelled"
            return
        row.tokens.append(token)
        if token in self.eos_ids and not row.params.ignore_eos:
            row.finish_reason = "stop"
        elif len(row.tokens) >= row.params.max_new_tokens:
            row.finish_reason = "length"
        if row.incremental:
            self.text.step(row, final=row.finish_reason is not None)

    def _finish(self, row: Row) -> None:
        if row.error is None and not row.incremental:
            try:
                row.text = self.text.whole(row)
            except Exception as e:
                self._fail(row, e)
        if row.on_done is not None:
            try:
                row.on_done(row)
            except Exception:
                log.exception("on_done of a finished row raised; the other rows go on")

    def _drop_finished(self, batch: RowBatch) -> RowBatch | None:
        done = [i for i, r in enumerate(batch.rows) if r.finish_reason is not None]
        if not done:
            return batch
        for i in done:
            self._finish(batch.rows[i])
        keep = [i for i, r in enumerate(batch.rows) if r.finish_reason is None]
        if not keep:
            return None
        batch.keep(keep)
        return batch
