"""The pub/sub thread behind RedisRegistry.listen: registry events to a callback, across Redis restarts."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

if TYPE_CHECKING:
    from .registry import RedisRegistry

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 5.0

RESYNC = {"op": "resync", "name": "", "version": 0}


class RegistryListener(threading.Thread):
    """The pub/sub thread behind RedisRegistry.listen; ``subscribed`` is set once events can arrive."""

    def __init__(
        self, registry: RedisRegistry, callback: Callable[[dict], None], stop: threading.Event
    ) -> None:
        super().__init__(name=f"registry-events-{registry.namespace}", daemon=True)
        self.registry, self.callback, self.stop = registry, callback, stop
        self.subscribed = threading.Event()
        self.reconnects = 0

    def run(self) -> None:
        backoff = 0.1
        while not self.stop.is_set():
            pubsub = self.registry.client.pubsub()
            try:
                pubsub.subscribe(self.registry.channel)
                while not self.stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self._handle(message)
                        backoff = 0.1
            except redis.RedisError as e:
                where = self.registry.where
                log.warning("registry events from %s lost (%s); retrying in %.1f s", where, e, backoff)
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            finally:
                with contextlib.suppress(redis.RedisError):
                    pubsub.close()

    def _handle(self, message: dict) -> None:
        if message["type"] == "subscribe":
            # Every confirmation after the first means a reconnect (ours, or redis-py's own retry).
            if self.subscribed.is_set():
                self.reconnects += 1
                self._deliver(dict(RESYNC))
            self.subscribed.set()
        elif message["type"] == "message":
            try:
                event = json.loads(message["data"])
            except ValueError:
                log.warning("ignoring malformed registry event %r", message["data"][:200])
                return
            self._deliver(event)

    def _deliver(self, event: dict) -> None:
        try:
            self.callback(event)
        except Exception:  # a faulty callback must not end the subscription
            log.exception("registry event callback failed for %s", event)
