"""Server-sent events and client disconnects.

A stream's first item is awaited before the response starts, so errors that happen before any token
(unknown adapter, full queue, prompt too long) still answer with their own status code. Once streaming, an
error becomes a final `data: {"error": ...}` event. When the client goes away, Starlette cancels the body
iterator; the engine's iterator is then closed (shielded from the cancellation) so the request leaves its
batch instead of generating for nobody.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import anyio
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from ..errors import ServiceError
from ..types import GenerationRequest, GenerationResult
from .exception_handlers import error_body

log = logging.getLogger("shira.service")
T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's "client closed request", so the request metric can tell these apart
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

DeltaFormat = Callable[[str], Iterable[dict[str, Any]]]
ResultFormat = Callable[[GenerationResult], Iterable[dict[str, Any]]]


def sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


async def open_stream(engine: Any, request: GenerationRequest) -> tuple[Any, AsyncIterator[Any]]:
    """Starts engine.stream and waits for its first item, so early errors keep their HTTP status."""
    stream = engine.stream(request)
    try:
        first = await stream.__anext__()
    except BaseException:
        await _close(stream)
        raise
    return first, stream


async def _close(stream: AsyncIterator[Any]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with anyio.CancelScope(shield=True):
            await aclose()


def sse_response(first: Any, stream: AsyncIterator[Any], on_delta: DeltaFormat, on_result: ResultFormat,
                 head: Iterable[dict[str, Any]] = ()) -> StreamingResponse:
    """Relays engine items as SSE: `head` events, one or more per delta, the result events, then [DONE]."""

    async def events() -> AsyncIterator[str]:
        item = first
        try:
            for event in head:
                yield sse(event)
            while True:
                if isinstance(item, GenerationResult):
                    for event in on_result(item):
                        yield sse(event)
                    break
                if item:
                    for event in on_delta(item):
                        yield sse(event)
                item = await stream.__anext__()
        except StopAsyncIteration:
            log.error("engine stream ended without a result")
            yield sse(error_body("internal_error", "the generation ended without a result"))
        except ServiceError as e:
            yield sse(error_body(e.code, e.message))
        finally:
            await _close(stream)
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Runs `work` but cancels it when the client disconnects first (then answers 499 to nobody)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return Response(status_code=CLIENT_CLOSED)
