"""Incremental detokenisation: each row's text grows token by token, is cut at stop strings, and is streamed
without ever sending a piece that a stop string could still claim, or half of a multi-byte character."""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """Turns rows' tokens into text (rows are service.batch_generation.Row).

    Args:
        tokenizer: the model's tokenizer.
        eos_ids: token ids that end a row; they are never part of its text.
    """

    def __init__(self, tokenizer: Any, eos_ids: set[int]) -> None:
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    def whole(self, row: Any) -> str:
        """A finished row's text in one decode (rows nobody streams and without stop strings)."""
        return self.tokenizer.decode(self._ids(row), skip_special_tokens=True)

    def _ids(self, row: Any) -> list[int]:
        return row.tokens[:-1] if row.tokens and row.tokens[-1] in self.eos_ids else row.tokens

    def step(self, row: Any, final: bool) -> None:
        """Adds a row's new text (cut at a stop string, which ends the row) and streams what is safe to send."""
        ids = self._ids(row)
        before = self.tokenizer.decode(ids[row.prefix_offset : row.read_offset], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[row.prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            start = max(0, len(row.text) - max((len(s) for s in row.params.stop), default=0))
            row.text += after[len(before):]
            row.prefix_offset, row.read_offset = row.read_offset, len(ids)
            if row.params.stop:
                hits = [pos for s in row.params.stop if (pos := row.text.find(s, start)) >= 0]
                if hits:
                    row.text = row.text[: min(hits)]
                    row.finish_reason = "stop"
                    final = True
        if row.on_text is not None:
            end = len(row.text) if final else len(row.text) - _held_back(row.text, row.params.stop)
            if end > row.emitted:
                row.on_text(row.text[row.emitted : end])
                row.emitted = end


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string (not emitted yet)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
