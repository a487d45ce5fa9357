"""The pub/sub thread behind RedisRegistry.listen: registry events to a callback, across Redis restarts."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)
MAX_BACKOFF_S = 5.0

RESYNC = {"op": "resync", "name": "", "version": 0}


class RegistryListener(threading.Thread):
    """The pub/sub thread behind RedisRegistry.listen; ``subscribed`` is set once events can arrive.

    Args:
        client: the registry's Redis client.
        channel: its event channel.
        where: the server's address, for the log only.
        callback: called with each event (and a resync after a lost subscription).
        stop: set it to end the thread.
    """

    def __init__(self, client: redis.Redis, channel: str, where: str, callback: Callable[[dict], None],
                 stop: threading.Event) -> None:
        super().__init__(name=f"registry-events-{channel}", daemon=True)
        self.client, self.channel, self.where = client, channel, where
        self.callback, self.stop = callback, stop
        self.subscribed = threading.Event()
        self.reconnects = 0

    def run(self) -> None:
        backoff = 0.1
        while not self.stop.is_set():
            pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                while not self.stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        self._handle(message)
                        backoff = 0.1
            except redis.RedisError as e:
                log.warning("registry events from %s lost (%s); retrying in %.1f s", self.where, e, backoff)
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
