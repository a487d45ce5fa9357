"""The batched decode loop: many requests for one adapter set, one forward pass per token for all of them.

Rows are left-padded so every row's newest token sits in the last column; each row carries its own
position ids, sampling settings and stop conditions. Finished or cancelled rows leave the batch at once
(their KV-cache rows are dropped), and new rows can join between steps: they are prefilled on their own
and their cache is left-padded to the running one's length before the two are concatenated.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from . import metrics
from .generation import SamplingParams


@dataclass(eq=False)
class Row:
    """One request inside a batch.

    Args:
        prompt_ids: the tokenised prompt (at least one token).
        params: sampling settings; temperature 0 is greedy.
        on_text: called with each complete piece of new text (streaming); None when nobody streams.
        on_done: called once with the row when it finishes, for any reason.
        cancelled: polled between steps; when it returns True the row leaves the batch.
        set_key: the row's adapter set, for mixed-set batches (rows of one set may share a SetDelta).
    """

    prompt_ids: list[int]
    params: SamplingParams
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[Row], None] | None = None
    cancelled: Callable[[], bool] = lambda: False
    set_key: Hashable = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    _emitted: int = 0
    _prefix: int = 0  # incremental detokenisation offsets into `tokens`
    _read: int = 0

    @property
    def incremental(self) -> bool:
        return self.on_text is not None or bool(self.params.stop)


class Guests(Protocol):
    """Mixed-set batches: per-row corrections applied during each forward pass (see service.mixed_batches)."""

    def prefill(self, rows: list[Row], running: list[Row]) -> contextlib.AbstractContextManager[Any]: ...

    def decode(self, rows: list[Row]) -> contextlib.AbstractContextManager[Any]: ...


@dataclass
class _Batch:
    rows: list[Row]
    cache: DynamicCache
    mask: torch.Tensor  # [B, T] 1 for real tokens, 0 for left padding
    positions: torch.Tensor  # [B] position id of the next input token
    last: torch.Tensor  # [B] the token each row feeds next


class BatchGenerator:
    """Runs batches of rows through one causal LM. Call only from the thread that owns the model.

    Args:
        model: a Hugging Face causal LM in eval mode.
        tokenizer: its tokenizer (for detokenisation and the pad/eos ids).
        eos_ids: token ids that end a row; default: the tokenizer's and generation config's EOS ids.
    """

    def __init__(self, model, tokenizer, eos_ids: set[int] | None = None) -> None:
        self.model = model
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
        # transformers 5 renamed past_key_values to cache; use whichever this version takes.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @torch.inference_mode()
    def run(self, rows: list[Row], admit: Callable[[int], list[Row]] | None = None, max_rows: int = 64,
            guests: Guests | None = None) -> int:
        """Generates until every row is finished.

        Args:
            rows: the rows to start with.
            admit: asked between steps for up to n more rows to join the batch (same adapter set, or any set
                `guests` accepted).
            max_rows: the batch never grows past this many rows.
            guests: rows of several adapter sets: wraps every forward pass with their corrections.

        Returns:
            Tokens generated, over all rows.
        """
        batch: _Batch | None = None
        pending = list(rows)
        produced = 0
        while True:
            if pending:
                for row in pending:
                    self._init_row(row)
                with guests.prefill(pending, batch.rows if batch else []) if guests else contextlib.nullcontext():
                    start = time.perf_counter()
                    joined, first = self._prefill(pending)
                    tokens = first.tolist()  # waits for the device, so the time is the pass's
                    metrics.STEP_SECONDS.labels("prefill").observe(time.perf_counter() - start)
                produced += self._advance(joined, tokens)
                batch = self._merge(batch, joined)
                batch = self._drop_finished(batch)
            if batch is None:
                pending = admit(max_rows) if admit else []
                if not pending:
                    return produced
                continue
            batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
            with guests.decode(batch.rows) if guests else contextlib.nullcontext():
                start = time.perf_counter()
                logits = self.model(
                    input_ids=batch.last[:, None],
                    attention_mask=batch.mask,
                    position_ids=batch.positions[:, None],
                    use_cache=True,
                    **{self._cache_arg: batch.cache},
                ).logits[:, -1]
                batch.last = self._sample(logits, batch.rows)
                tokens = batch.last.tolist()
                metrics.STEP_SECONDS.labels("decode").observe(time.perf_counter() - start)
            batch.positions = batch.positions + 1
            produced += self._advance(batch, tokens)
            batch = self._drop_finished(batch)
            room = max_rows - (len(batch.rows) if batch else 0)
            pending = admit(room) if admit and room > 0 else []

    def _init_row(self, row: Row) -> None:
        if not row.prompt_ids:
            raise ValueError("a row needs at least one prompt token")
        if row.params.temperature > 0:
            row.generator = torch.Generator(device=self.device)
            if row.params.seed is not None:
                row.generator.manual_seed(row.params.seed)
            else:
                row.generator.seed()

    def _prefill(self, rows: list[Row]) -> tuple[_Batch, torch.Tensor]:
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
        first = self._sample(logits, rows)
        return _Batch(rows, cache, mask, positions[:, -1] + 1, first), first

    def _sample(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        picked = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if r.generator is not None]
        if not sampled:
            return picked
        index = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([rows[i].params.temperature for i in sampled], device=logits.device)
        probs = torch.softmax(logits.index_select(0, index).float() / temps[:, None], dim=-1)
        top_p = [rows[i].params.top_p for i in sampled]
        if any(p < 1.0 for p in top_p):
            ordered, order = probs.sort(dim=-1, descending=True)
            cut = (ordered.cumsum(-1) - ordered) >= torch.tensor(top_p, device=logits.device)[:, None]
            probs = torch.zeros_like(probs).scatter_(-1, order, ordered.masked_fill(cut, 0.0))
        for j, i in enumerate(sampled):
            picked[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
        return picked

    def _advance(self, batch: _Batch, tokens: list[int]) -> int:
        """Appends each row's new token and settles EOS, length, stop strings and cancellation."""
        for row, token in zip(batch.rows, tokens, strict=True):
            if row.cancelled():
                row.finish_reason = "cancelled"
                continue
            row.tokens.append(token)
            if token in self.eos_ids:
                row.finish_reason = "stop"
            elif len(row.tokens) >= row.params.max_new_tokens:
                row.finish_reason = "length"
            if row.incremental:
                self._detokenize(row, final=row.finish_reason is not None)
        return len(tokens)

    def _detokenize(self, row: Row, final: bool) -> None:
        ids = row.tokens[:-1] if row.tokens and row.tokens[-1] in self.eos_ids else row.tokens
        before = self.tokenizer.decode(ids[row._prefix : row._read], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[row._prefix :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            start = max(0, len(row.text) - max((len(s) for s in row.params.stop), default=0))
            row.text += after[len(before):]
            row._prefix, row._read = row._read, len(ids)
            if row.params.stop:
                hits = [pos for s in row.params.stop if (pos := row.text.find(s, start)) >= 0]
                if hits:
                    row.text = row.text[: min(hits)]
                    row.finish_reason = "stop"
                    final = True
        if row.on_text is not None:
            end = len(row.text) if final else len(row.text) - _held_back(row.text, row.params.stop)
            if end > row._emitted:
                row.on_text(row.text[row._emitted : end])
                row._emitted = end

    def _finish(self, row: Row) -> None:
        if not row.incremental:
            ids = row.tokens[:-1] if row.tokens and row.tokens[-1] in self.eos_ids else row.tokens
            row.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if row.on_done is not None:
            row.on_done(row)

    def _drop_finished(self, batch: _Batch) -> _Batch | None:
        done = [i for i, r in enumerate(batch.rows) if r.finish_reason is not None]
        if not done:
            return batch
        for i in done:
            self._finish(batch.rows[i])
        keep = [i for i, r in enumerate(batch.rows) if r.finish_reason is None]
        if not keep:
            return None
        index = torch.tensor(keep, device=self.device)
        batch.cache.batch_select_indices(index)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask = batch.mask.index_select(0, index)
        batch.positions = batch.positions.index_select(0, index)
        batch.last = batch.last.index_select(0, index)
        # Columns that are padding for every remaining row are dead weight in each attention step.
        lead = int(batch.mask.any(dim=0).int().argmax())
        if lead > 0:
            _crop_left(batch, lead)
        return batch

    def _merge(self, running: _Batch | None, joined: _Batch) -> _Batch:
        if running is None:
            return joined
        width = max(running.mask.shape[1], joined.mask.shape[1])
        _pad_left(running, width - running.mask.shape[1])
        _pad_left(joined, width - joined.mask.shape[1])
        for mine, theirs in zip(running.cache.layers, joined.cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        running.rows = running.rows + joined.rows
        running.mask = torch.cat([running.mask, joined.mask], dim=0)
        running.positions = torch.cat([running.positions, joined.positions])
        running.last = torch.cat([running.last, joined.last])
        return running


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string (not emitted yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def _pad_left(batch: _Batch, n: int) -> None:
    if n <= 0:
        return
    for layer in batch.cache.layers:
        shape = list(layer.keys.shape)
        shape[-2] = n
        layer.keys = torch.cat([layer.keys.new_zeros(shape), layer.keys], dim=-2)
        layer.values = torch.cat([layer.values.new_zeros(shape[:-1] + [layer.values.shape[-1]]), layer.values], dim=-2)
    batch.mask = torch.cat([batch.mask.new_zeros(batch.mask.shape[0], n), batch.mask], dim=1)


def _crop_left(batch: _Batch, n: int) -> None:
    for layer in batch.cache.layers:
        layer.keys = layer.keys[:, :, n:]
        layer.values = layer.values[:, :, n:]
    batch.mask = batch.mask[:, n:]
