"""The adapter registry: versioned records and content-addressed, chunked blobs in Redis.

Key layout under ``<ns>:`` (names match ``NAME_RE``, so they never contain ``:`` or ``@``):

    names                  ZSET  every name with a live version, score 0 (so ZRANGE is sorted by name)
    seq:<name>             STR   version counter; INCR inside the commit script gives n+1, n+2 under races.
                                 It outlives a delete: versions of a name are never reused
    versions:<name>        ZSET  live versions of a name, score = member = version
    rec:<name>:<version>   HASH  the AdapterRecord fields plus ``chunks`` (chunk sha256s in order)
    blob:<sha256>          STR   one chunk, keyed by the sha256 of its own bytes (identical chunks share it)
    refs:<sha256>          SET   ``name@version`` of every record using the blob; the blob goes with the last
    pending:<upload>:<sha> STR   a chunk of an upload not yet committed, with a TTL so abandoned ones expire
    events                 pub/sub channel, JSON {"op": "put"|"delete", "name", "version", ...}

Only the commit and delete Lua scripts touch names/seq/versions/rec/blob/refs, so each runs atomically with
respect to the other: a reader sees an adapter completely or not at all. The scripts build key names from the
prefix, so the registry needs a single Redis node (not a cluster).
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from .errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    InvalidRequestError,
    RegistryIntegrityError,
    RegistryUnavailableError,
)
from .registry_events import RegistryListener
from .registry_records import AdapterRecord, describe_client, pairs
from .registry_scripts import COMMIT, DELETE, RECORD, STAMP
from .validation import check_name

log = logging.getLogger(__name__)

PENDING_TTL_S = 3600  # an upload slower than this must start again
READ_BATCH = 4  # chunks per pipeline when reading: bounds the reply buffer at 4 x chunk_bytes
COMMIT_ATTEMPTS = 3
MAX_LIST_LIMIT = 1000
MAX_LIST_OFFSET = 2**31 - 1  # Redis refuses ZRANGE ranges past a signed 64-bit end; no registry holds this many
PENDING_SCAN_KEYS = 10_000  # pending() counts at most this many chunks...
PENDING_SCAN_CALLS = 100  # ...in at most this many SCAN round trips
# What clients read when Redis fails: the address and the cause are for the server log only.
UNAVAILABLE = "the adapter registry is unavailable; retry shortly (the server log names the cause)"


def _guarded(method: Callable) -> Callable:
    """Turns every Redis failure into RegistryUnavailableError; the server's address goes to the log only."""

    @functools.wraps(method)
    def wrapper(self: RedisRegistry, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as e:
            log.warning("adapter registry at %s failed in %s (%s: %s); check that Redis is running and "
                        "SHIRA_REDIS_URL points to it", self.where, method.__name__, type(e).__name__, e)
            raise RegistryUnavailableError(UNAVAILABLE) from e

    return wrapper


def _glob_escape(text: str) -> str:
    """``text`` as a literal inside a Redis MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisRegistry:
    """Adapter versions and their bytes in Redis; see the module docstring for the key layout.

    Args:
        client: a sync ``redis.Redis`` with ``decode_responses=False`` (see ``embedded_redis.connect``).
        namespace: prefix of every key and of the event channel.
        chunk_bytes: size of the blobs an adapter is cut into.
        pending_ttl_s: how long chunks of an unfinished upload live.
    """

    def __init__(
        self,
        client: redis.Redis,
        namespace: str = "shira",
        chunk_bytes: int = 4 * 2**20,
        pending_ttl_s: int = PENDING_TTL_S,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.client = client
        self.namespace = namespace
        self.prefix = namespace + ":"
        self.channel = self.prefix + "events"
        self.chunk_bytes = chunk_bytes
        self.pending_ttl_s = pending_ttl_s
        self.where = describe_client(client)
        self._commit = client.register_script(COMMIT)
        self._delete = client.register_script(DELETE)
        self._record = client.register_script(RECORD)
        self._stamp = client.register_script(STAMP)

    # -- writing -----------------------------------------------------------------------------------------

    @_guarded
    def put(self, name: str, data: bytes, info: dict, if_absent: bool = False) -> AdapterRecord:
        """Stores ``data`` as version n+1 of ``name`` and publishes a ``put`` event.

        Args:
            name: adapter name (``NAME_RE``).
            data: native shira safetensors bytes, already validated by the caller.
            info: ``nnz``, ``density``, ``layers``, ``base_fingerprint``; optional ``mask``,
                ``description``.
            if_absent: store only when ``name`` has no version yet, checked inside the commit so that of two
                racing uploads exactly one wins.

        Returns:
            The new record.

        Raises:
            AdapterConflictError: if_absent and the name exists.
        """
        check_name(name)
        if not data:
            raise InvalidRequestError(f"adapter {name!r}: the upload is empty")
        fields = self._record_fields(name, data, info)
        chunks = self.chunk_shas(data)
        fields["chunks"] = " ".join(chunks)
        flat = [str(x) for kv in fields.items() for x in kv]
        unique = list(dict.fromkeys(chunks))
        # The first try skips chunks already stored; a racing delete may remove them, so retries send all.
        rewrite = False
        for _ in range(COMMIT_ATTEMPTS):
            upload = uuid.uuid4().hex
            written = self.write_pending(upload, data, chunks, skip_stored=not rewrite)
            try:
                flag = "1" if if_absent else "0"
                result = self._commit(args=[self.prefix, name, upload, json.dumps(flat), flag, *unique])
            except BaseException:
                self._drop_pending(upload, written)
                raise
            if int(result[0]) == -2:
                self._drop_pending(upload, written)
                raise AdapterConflictError(
                    f"adapter {name!r} already exists (version {int(result[1])}); drop if_absent to add a new version"
                )
            if int(result[0]) > 0:
                # Built here rather than read back: a delete may already have removed it again.
                return AdapterRecord.from_fields({**fields, "version": result[0]})
            self._drop_pending(upload, written)
            rewrite = True
            log.info("adapter %s: chunk %s vanished before commit; uploading again", name, result[1].decode())
        log.warning("adapter %s: could not commit to the registry at %s after %d attempts; its chunks "
                    "vanished before each commit (expired after %d s, deleted, or evicted by Redis)",
                    name, self.where, COMMIT_ATTEMPTS, self.pending_ttl_s)
        raise RegistryUnavailableError(
            f"adapter {name!r}: could not commit after {COMMIT_ATTEMPTS} attempts, its chunks vanished before "
            "each commit; retry shortly (the server log names the cause)"
        )

    def chunk_shas(self, data: bytes) -> builtins.list[str]:
        """The sha256 of each ``chunk_bytes`` piece of ``data``, in order."""
        view, size = memoryview(data), self.chunk_bytes
        return [hashlib.sha256(view[i : i + size]).hexdigest() for i in range(0, len(data), size)]

    def write_pending(
        self, upload: str, data: bytes, chunks: builtins.list[str] | None = None, skip_stored: bool = True
    ) -> builtins.list[str]:
        """Writes the chunks of ``data`` under pending keys with a TTL; nothing is visible until the commit.

        Args:
            upload: a fresh id for this attempt.
            data: the adapter bytes.
            chunks: ``chunk_shas(data)`` when the caller has it already.
            skip_stored: leave out chunks already stored as blobs.

        Returns:
            The chunk sha256s written.
        """
        chunks = chunks or self.chunk_shas(data)
        view, size = memoryview(data), self.chunk_bytes
        pieces = {}
        for i, sha in enumerate(chunks):
            pieces.setdefault(sha, view[i * size : (i + 1) * size])
        shas = list(pieces)
        if skip_stored:
            pipe = self.client.pipeline(transaction=False)
            for sha in shas:
                pipe.exists(self.prefix + "blob:" + sha)
            shas = [sha for sha, stored in zip(shas, pipe.execute(), strict=True) if not stored]
        for start in range(0, len(shas), READ_BATCH):
            pipe = self.client.pipeline(transaction=False)
            for sha in shas[start : start + READ_BATCH]:
                pipe.set(self._pending_key(upload, sha), pieces[sha], ex=self.pending_ttl_s)
            pipe.execute()
        return shas

    def _drop_pending(self, upload: str, shas: builtins.list[str]) -> None:
        # Best effort: what is left expires with its TTL anyway.
        if shas:
            with contextlib.suppress(redis.RedisError):
                self.client.delete(*(self._pending_key(upload, sha) for sha in shas))

    def _pending_key(self, upload: str, sha: str) -> str:
        return f"{self.prefix}pending:{upload}:{sha}"

    @staticmethod
    def _record_fields(name: str, data: bytes, info: dict) -> dict[str, Any]:
        missing = [k for k in ("nnz", "density", "layers", "base_fingerprint") if k not in info]
        if missing:
            raise InvalidRequestError(f"adapter {name!r}: info lacks {', '.join(missing)}")
        try:
            nnz, layers, density = int(info["nnz"]), int(info["layers"]), float(info["density"])
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(
                f"adapter {name!r}: nnz, layers and density must be numbers ({e})"
            ) from e
        if nnz < 0 or layers < 0 or not 0.0 <= density <= 1.0:
            raise InvalidRequestError(
                f"adapter {name!r}: need nnz >= 0, layers >= 0 and 0 <= density <= 1, "
                f"got nnz={nnz}, layers={layers}, density={density}"
            )
        return {
            "name": name, "sha256": hashlib.sha256(data).hexdigest(),
            "base_fingerprint": str(info["base_fingerprint"]), "nnz": nnz, "density": repr(density),
            "bytes": len(data), "layers": layers, "mask": str(info.get("mask", "")),
            "description": str(info.get("description", "")), "created": repr(time.time()),
        }

    @_guarded
    def delete(self, name: str) -> builtins.list[int]:
        """Removes every version of ``name`` and the blobs nobody else uses; publishes a ``delete`` event.

        The version counter (``seq:<name>``) stays, so a later upload of the name continues from the last
        version: versions of a name are never reused, and ``name@3`` never means two different adapters.

        Returns:
            The versions removed.
        """
        check_name(name)
        removed = self._delete(args=[self.prefix, name])
        if not removed:
            raise AdapterNotFoundError(f"adapter {name!r} not found; nothing to delete")
        return [int(v) for v in removed]

    # -- reading -----------------------------------------------------------------------------------------

    @_guarded
    def record(self, name: str, version: int | None = None) -> AdapterRecord:
        """The record of ``name@version``, or of the latest version when ``version`` is None."""
        check_name(name)
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise InvalidRequestError(
                f"adapter {name!r}: version must be a positive integer, got {version!r}"
            )
        raw = self._record(args=[self.prefix, name, "" if version is None else str(version)])
        if not raw:
            which = f"{name!r}" if version is None else f"{name!r} version {version}"
            raise AdapterNotFoundError(f"adapter {which} not found")
        return AdapterRecord.from_hash(pairs(raw))

    @_guarded
    def read(self, record: AdapterRecord) -> bytes:
        """The stored bytes of ``record``, reassembled from its chunks and checked against its sha256."""
        current = self.record(record.name, record.version)
        if current.sha256 != record.sha256:
            raise AdapterNotFoundError(
                f"adapter {record.ref} was replaced (sha256 {current.sha256[:12]}, "
                f"not {record.sha256[:12]}); fetch its record again"
            )
        parts: builtins.list[bytes] = []
        for start in range(0, len(current.chunks), READ_BATCH):
            batch = current.chunks[start : start + READ_BATCH]
            pipe = self.client.pipeline(transaction=False)
            for sha in batch:
                pipe.get(self.prefix + "blob:" + sha)
            for sha, blob in zip(batch, pipe.execute(), strict=True):
                if blob is None:
                    raise AdapterNotFoundError(
                        f"adapter {record.ref} was deleted while reading (chunk {sha[:12]} is gone)"
                    )
                parts.append(blob)
        data = b"".join(parts)
        digest = hashlib.sha256(data).hexdigest()
        if digest != record.sha256 or len(data) != record.bytes:
            raise RegistryIntegrityError(
                f"adapter {record.ref}: stored bytes hash to {digest[:12]} ({len(data):,} bytes), "
                f"the record says {record.sha256[:12]} ({record.bytes:,} bytes); delete and upload it again"
            )
        return data

    @_guarded
    def list_latest(self, offset: int = 0, limit: int = 50) -> tuple[builtins.list[AdapterRecord], int]:
        """The latest version of each name, sorted by name, and the total number of names."""
        if not 0 <= offset <= MAX_LIST_OFFSET or not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequestError(
                f"need 0 <= offset <= {MAX_LIST_OFFSET} and 1 <= limit <= {MAX_LIST_LIMIT}, "
                f"got offset={offset}, limit={limit}"
            )
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(self.prefix + "names")
        pipe.zrange(self.prefix + "names", offset, offset + limit - 1)
        total, names = pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            self._record(args=[self.prefix, name, ""], client=pipe)
        # A name deleted between the two round trips has an empty hash: leave it out.
        records = [AdapterRecord.from_hash(pairs(r)) for r in pipe.execute() if r]
        return records, int(total)

    @_guarded
    def versions(self, name: str) -> builtins.list[AdapterRecord]:
        """Every live version of ``name``, oldest first; AdapterNotFoundError when there is none."""
        check_name(name)
        numbers = self.client.zrange(f"{self.prefix}versions:{name}", 0, -1)
        pipe = self.client.pipeline(transaction=False)
        for v in numbers:
            pipe.hgetall(f"{self.prefix}rec:{name}:{v.decode()}")
        records = [AdapterRecord.from_hash(raw) for raw in pipe.execute() if raw]
        if not records:
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        return records

    @_guarded
    def stamp(self, name: str, version: int | None = None) -> str | None:
        """``"<version>:<sha256>"`` of the latest (or given) version, None when gone: one cheap round trip.

        A replica compares it to ``AdapterRecord.stamp`` of its cached copy before serving, so a copy
        deleted or replaced while a pub/sub message was missed is never served.
        """
        check_name(name)
        stamp = self._stamp(args=[self.prefix, name, "" if version is None else int(version)])
        return None if stamp is None else stamp.decode()

    @_guarded
    def pending(
        self, max_keys: int = PENDING_SCAN_KEYS, max_calls: int = PENDING_SCAN_CALLS
    ) -> tuple[int, int, bool]:
        """Chunks of uncommitted uploads under this namespace: a bounded SCAN, for the metrics scrape.

        An upload whose server died before the commit leaves its chunks until ``pending_ttl_s`` expires them.

        Args:
            max_keys: stop after counting this many chunks.
            max_calls: stop after this many SCAN round trips (SCAN walks the whole database, not only ours).

        Returns:
            (chunks, bytes, complete): complete is False when a bound stopped the count early.
        """
        match = _glob_escape(self.prefix) + "pending:*"
        cursor, chunks, size = 0, 0, 0
        for _ in range(max_calls):
            cursor, found = self.client.scan(cursor, match=match, count=1000)
            keys = found[: max_keys - chunks]
            if keys:
                pipe = self.client.pipeline(transaction=False)
                for key in keys:
                    pipe.strlen(key)
                size += sum(pipe.execute())  # an expired key reads as 0
                chunks += len(keys)
            if len(keys) < len(found):
                break
            if int(cursor) == 0:
                return chunks, size, True
        return chunks, size, False

    def ping(self) -> bool:
        """True when Redis answers; False (never an exception) when it does not, for health checks."""
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    # -- events ------------------------------------------------------------------------------------------

    def listen(self, callback: Callable[[dict], None], stop: threading.Event) -> RegistryListener:
        """Starts a daemon thread calling ``callback(event)`` for each registry event until ``stop`` is set.

        Events are ``{"op": "put"|"delete", "name", "version", ...}``. After the subscription was lost
        (Redis restarted or unreachable; it reconnects with backoff) it also delivers
        ``{"op": "resync", "name": "", "version": 0}``: events may have been missed, drop cached state.
        """
        listener = RegistryListener(self.client, self.channel, self.where, callback, stop)
        listener.start()
        return listener
