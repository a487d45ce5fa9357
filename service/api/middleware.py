"""Pure ASGI middleware (no BaseHTTPMiddleware, so streaming and disconnects pass through untouched)."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..metrics import REQUESTS
from .exception_handlers import error_body

GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
UNRESOLVED = "unresolved"  # label for requests that failed before their adapter set was resolved


class RequestMetricsMiddleware:
    """Counts generation requests by the status actually sent (499: client went away) and a bounded adapter
    label (service.api.adapter_sets.metric_label; UNRESOLVED before the set was resolved)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        status = 500  # if the app raises before answering, the outer handler sends a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            label = (scope.get("state") or {}).get("adapter_label", UNRESOLVED)
            REQUESTS.labels(adapter=label, status=str(status)).inc()


class BodyLimitMiddleware:
    """Refuses request bodies over `limit` bytes with 413, by Content-Length or while reading.

    Uploads to `exempt` paths enforce their own (larger) limit as they stream; every other body is small
    JSON, so it is buffered here and replayed to the app.
    """

    def __init__(self, app: ASGIApp, limit: int, exempt: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.limit = limit
        self.exempt = exempt

    async def _too_large(self, send: Send, size: str) -> None:
        body = json.dumps(
            error_body("payload_too_large", f"request body is {size} bytes, over the limit of {self.limit:,}")
        ).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        # bytes.isdigit() is ASCII only; the length bound keeps int() off a header of thousands of digits
        if length is not None and length.isdigit() and (len(length) > 18 or int(length) > self.limit):
            await self._too_large(send, f"{int(length):,}" if len(length) <= 18 else f"a {len(length)}-digit")
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                chunks = []  # disconnected while sending; let the app see it
                pending: list[Message] = [message]
                break
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.limit:
                await self._too_large(send, f"over {total:,}")
                return
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Any:
            if pending:
                return pending.pop(0)
            return await receive()

        await self.app(scope, replay, send)
