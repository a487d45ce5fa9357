"""A running batch's tensors: left-padded rows, their attention mask, positions and KV cache.

Rows are left-padded so every row's newest token sits in the last column. Batches join by padding the shorter
one on the left and concatenating; finished rows leave by selecting the cache rows that stay, and columns that
are padding for every remaining row are cropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache


@dataclass
class RowBatch:
    rows: list[Any]  # batch_generation.Row, one per batch row
    cache: DynamicCache
    mask: torch.Tensor  # [B, T] 1 for real tokens, 0 for left padding
    positions: torch.Tensor  # [B] position id of the next input token
    last: torch.Tensor  # [B] the token each row feeds next

    def merge(self, joined: RowBatch) -> RowBatch:
        """Appends the rows of `joined` (prefilled on their own) to this batch; returns self."""
        width = max(self.mask.shape[1], joined.mask.shape[1])
        self._pad_left(width - self.mask.shape[1])
        joined._pad_left(width - joined.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, joined.cache.layers, strict=True):
            mine.keys = torch.cat([mine.keys, theirs.keys], dim=0)
            mine.values = torch.cat([mine.values, theirs.values], dim=0)
        self.rows = self.rows + joined.rows
        self.mask = torch.cat([self.mask, joined.mask], dim=0)
        self.positions = torch.cat([self.positions, joined.positions])
        self.last = torch.cat([self.last, joined.last])
        return self

    def keep(self, keep: list[int]) -> None:
        """Keeps only the rows at `keep`, then crops the columns that are padding for all of them."""
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.last = self.last.index_select(0, index)
        # Columns that are padding for every remaining row are dead weight in each attention step.
        lead = int(self.mask.any(dim=0).int().argmax())
        if lead > 0:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self.mask = self.mask[:, lead:]

    def select(self, index: slice, config: Any) -> RowBatch:
        """Some rows as a batch of their own; the cache rows are views, not copies."""
        cache = DynamicCache(config=config)
        for mine, theirs in zip(cache.layers, self.cache.layers, strict=True):
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys, mine.values = theirs.keys[index], theirs.values[index]
        return RowBatch(self.rows[index], cache, self.mask[index], self.positions[index], self.last[index])

    def truncate(self, length: int) -> None:
        """Drops cached positions past `length` (those a failed forward pass appended in some layers)."""
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]

    def _pad_left(self, n: int) -> None:
        if n <= 0:
            return
        for layer in self.cache.layers:
            shape = list(layer.keys.shape)
            shape[-2] = n
            layer.keys = torch.cat([layer.keys.new_zeros(shape), layer.keys], dim=-2)
            values = list(layer.values.shape)
            values[-2] = n
            layer.values = torch.cat([layer.values.new_zeros(values), layer.values], dim=-2)
        self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], n), self.mask], dim=1)
