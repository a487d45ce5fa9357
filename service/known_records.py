"""The registry records an engine has resolved, kept in step with the registry's events.

Every request still reads its records from Redis (so a deleted adapter is never served stale); these copies
only answer while Redis is unreachable, and only for adapters whose bytes are cached. Events drop what was
deleted or replaced; after a lost subscription (missed events) each copy is checked against its stamp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .errors import RegistryUnavailableError


class KnownRecords:
    """Records resolved so far: the latest per name, and each (name, version).

    Args:
        registry: the RedisRegistry (record, stamp).
        is_cached: whether a record's adapter bytes are in the adapter cache (only those serve during an outage).
        forget_cached: drops the cache entries of these names (deleted adapters).
    """

    def __init__(self, registry: Any, is_cached: Callable[[Any], bool],
                 forget_cached: Callable[[Iterable[str]], Any]) -> None:
        self.registry, self._is_cached, self._forget_cached = registry, is_cached, forget_cached
        self._latest: dict[str, Any] = {}  # name -> newest record seen
        self._versions: dict[tuple[str, int], Any] = {}  # (name, version) -> record

    def record(self, name: str, version: int | None) -> Any:
        """The registry's record; while Redis is down, the copy of one whose adapter is cached."""
        try:
            record = self.registry.record(name, version)
        except RegistryUnavailableError:
            known = self._latest.get(name) if version is None else self._versions.get((name, version))
            if known is None or not self._is_cached(known):
                raise
            return known
        self._versions[(name, record.version)] = record
        if version is None:
            self._latest[name] = record
        return record

    def on_event(self, event: dict) -> None:
        """A registry event (RedisRegistry.listen)."""
        name = event.get("name", "")
        if event.get("op") == "resync":
            self._resync()
        elif event.get("op") in ("delete", "put") and name:
            # A put makes a new latest version; a delete (or a delete then re-upload) invalidates all.
            self._latest.pop(name, None)
            if event["op"] == "delete":
                self._forget(name)

    def _forget(self, name: str) -> None:
        self._versions = {k: v for k, v in self._versions.items() if k[0] != name}
        self._forget_cached([name])

    def _resync(self) -> None:
        # Events were missed while the subscription was down. Keep only records Redis still holds unchanged,
        # so a later outage never serves from memory an adapter deleted or replaced in between.
        for name in set(self._latest) | {n for n, _ in self._versions}:
            latest = self.registry.stamp(name)
            if latest is None:
                self._latest.pop(name, None)
                self._forget(name)
                continue
            record = self._latest.get(name)
            if record is not None and record.stamp != latest:
                self._latest.pop(name, None)
            for key, record in [(k, r) for k, r in self._versions.items() if k[0] == name]:
                if self.registry.stamp(name, key[1]) != record.stamp:
                    self._versions.pop(key, None)
