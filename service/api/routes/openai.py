"""OpenAI-compatible routes, so standard OpenAI clients work unchanged.

`model` names an adapter (boolq, boolq@2), the base model ("base" or its label) or a weighted set
("boolq:0.6+piqa:0.4", optionally followed by "[ties]"). Temperature defaults to 1 as in OpenAI's API.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from ...adapter_service import BASE_MODEL_ID
from ...deps import EngineDep, ReaderDep, RegistryDep, SettingsDep
from ...generation import GenerationResult
from ...protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionBody,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionBody,
    CompletionChoice,
    CompletionResponse,
    ErrorResponse,
    OpenAIModel,
    OpenAIModelList,
    Usage,
    sse_content,
)
from .. import requests as build
from ..streaming import open_stream, sse_response, until_disconnect

router = APIRouter(prefix="/v1", tags=["openai"])
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 422, 503)}
_STREAMED = "JSON, or server-sent events (chunks, then [DONE]) when stream=true."
OWNER = "shira"
PAGE = 500


def _usage(result: GenerationResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


def _list_all(registry: Any) -> list[Any]:
    records, total = registry.list(offset=0, limit=PAGE)
    while len(records) < total:
        page, total = registry.list(offset=len(records), limit=PAGE)
        if not page:
            break
        records.extend(page)
    return records


@router.get("/models", response_model=OpenAIModelList, responses=_ERRORS)
async def list_models(_: ReaderDep, registry: RegistryDep, request: Request) -> OpenAIModelList:
    """The base model (id "base") and every adapter."""
    records = await asyncio.to_thread(_list_all, registry)
    started = int(request.app.state.started)
    models = [OpenAIModel(id=BASE_MODEL_ID, created=started, owned_by=OWNER)]
    models += [OpenAIModel(id=r.name, created=int(r.created), owned_by=OWNER) for r in records]
    return OpenAIModelList(data=models)


async def _prepare(request: Request, engine: Any, settings: Any, body: Any, prompt_ids: list[int],
                   max_tokens: int | None, field: str) -> Any:
    adapter_set = build.model_set(body.model, engine.model_label, settings)
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    params = build.sampling(settings, max_tokens, temperature, top_p, body.seed, body.stop, field=field)
    return await build.prepare(engine, prompt_ids, params, adapter_set, request.state)


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post(
    "/completions", response_model=CompletionResponse,
    responses={**_ERRORS, 200: {"content": sse_content(CompletionResponse), "description": _STREAMED}},
)
async def completions(
    request: Request, body: CompletionBody, _: ReaderDep, engine: EngineDep, settings: SettingsDep
) -> Any:
    """Text completion (OpenAI /v1/completions), streaming included."""
    prompt_ids = build.encode(engine, prompt=body.prompt_text())
    gen = await _prepare(request, engine, settings, body, prompt_ids, body.max_tokens, "max_tokens")
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    def final(result: GenerationResult) -> list[dict[str, Any]]:
        events = [chunk("", result.finish_reason)]
        if _include_usage(body):
            events.append({**chunk("", None), "choices": [], "usage": _usage(result).model_dump()})
        return events

    if body.stream:
        first, stream = await open_stream(engine, gen)
        return sse_response(first, stream, on_delta=lambda text: [chunk(text, None)], on_result=final)
    result = await until_disconnect(request, engine.generate(gen))
    if not isinstance(result, GenerationResult):
        return result
    return CompletionResponse(
        id=rid, created=created, model=body.model, usage=_usage(result),
        choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
    )


@router.post(
    "/chat/completions", response_model=ChatCompletionResponse,
    responses={**_ERRORS, 200: {"content": sse_content(ChatCompletionChunk), "description": _STREAMED}},
)
async def chat_completions(
    request: Request, body: ChatCompletionBody, _: ReaderDep, engine: EngineDep, settings: SettingsDep
) -> Any:
    """Chat completion (OpenAI /v1/chat/completions) with the model's chat template, streaming included."""
    prompt_ids = build.encode(engine, messages=body.messages)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    gen = await _prepare(request, engine, settings, body, prompt_ids, max_tokens, field)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def final(result: GenerationResult) -> list[dict[str, Any]]:
        events = [chunk({}, result.finish_reason)]
        if _include_usage(body):
            events.append({**chunk({}, None), "choices": [], "usage": _usage(result).model_dump()})
        return events

    if body.stream:
        first, stream = await open_stream(engine, gen)
        return sse_response(
            first, stream, head=[chunk({"role": "assistant", "content": ""}, None)],
            on_delta=lambda text: [chunk({"content": text}, None)], on_result=final,
        )
    result = await until_disconnect(request, engine.generate(gen))
    if not isinstance(result, GenerationResult):
        return result
    return ChatCompletionResponse(
        id=rid, created=created, model=body.model, usage=_usage(result),
        choices=[ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
    )
