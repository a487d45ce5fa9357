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

from ...deps import GenerationDep, ReaderDep, RegistryDep
from ...protocol import (
    GENERATION_ERRORS,
    AssistantMessage,
    ChatChoice,
    ChatCompletionBody,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionBody,
    CompletionChoice,
    CompletionResponse,
    OpenAIModel,
    OpenAIModelList,
    Usage,
    sse_content,
)
from ...types import GenerationResult
from ...validation import BASE_MODEL_ID
from ..serving import Formats, GenerationHandler

router = APIRouter(prefix="/v1", tags=["openai"])
_STREAMED = "JSON, or server-sent events (chunks, then [DONE]) when stream=true."
OWNER = "shira"
PAGE = 500


def _usage(result: GenerationResult) -> Usage:
    return Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=result.prompt_tokens + result.completion_tokens)


def _list_all(registry: Any) -> list[Any]:
    records, total = registry.list_latest(offset=0, limit=PAGE)
    while len(records) < total:
        page, total = registry.list_latest(offset=len(records), limit=PAGE)
        if not page:
            break
        records.extend(page)
    return records


@router.get("/models", response_model=OpenAIModelList, responses=GENERATION_ERRORS)
async def list_models(_: ReaderDep, registry: RegistryDep, request: Request) -> OpenAIModelList:
    """The base model (id "base") and every adapter."""
    records = await asyncio.to_thread(_list_all, registry)
    started = int(request.app.state.started)
    models = [OpenAIModel(id=BASE_MODEL_ID, created=started, owned_by=OWNER)]
    models += [OpenAIModel(id=r.name, created=int(r.created), owned_by=OWNER) for r in records]
    return OpenAIModelList(data=models)


def _sampling(handler: GenerationHandler, body: Any, max_tokens: int | None, field: str) -> Any:
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    return handler.sampling(max_tokens, temperature, top_p, body.seed, body.stop, field=field,
                            ignore_eos=body.ignore_eos)


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@router.post(
    "/completions", response_model=CompletionResponse,
    responses={**GENERATION_ERRORS, 200: {"content": sse_content(CompletionResponse), "description": _STREAMED}},
)
async def completions(request: Request, body: CompletionBody, _: ReaderDep, handler: GenerationDep) -> Any:
    """Text completion (OpenAI /v1/completions), streaming included."""
    prompt_ids = handler.encode(prompt=body.prompt_text())
    adapter_set = handler.model_set(body.model)
    params = _sampling(handler, body, body.max_tokens, "max_tokens")
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}

    def final(result: GenerationResult) -> list[dict[str, Any]]:
        events = [chunk("", result.finish_reason)]
        if _include_usage(body):
            events.append({**chunk("", None), "choices": [], "usage": _usage(result).model_dump()})
        return events

    def answer(result: GenerationResult) -> CompletionResponse:
        return CompletionResponse(
            id=rid, created=created, model=body.model, usage=_usage(result),
            choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
        )

    formats = Formats(body=answer, delta=lambda text: [chunk(text, None)], result=final)
    return await handler.serve(request, adapter_set, params, prompt_ids, bool(body.stream), formats)


@router.post(
    "/chat/completions", response_model=ChatCompletionResponse,
    responses={**GENERATION_ERRORS, 200: {"content": sse_content(ChatCompletionChunk), "description": _STREAMED}},
)
async def chat_completions(request: Request, body: ChatCompletionBody, _: ReaderDep, handler: GenerationDep) -> Any:
    """Chat completion (OpenAI /v1/chat/completions) with the model's chat template, streaming included."""
    prompt_ids = handler.encode(messages=body.messages)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    adapter_set = handler.model_set(body.model)
    params = _sampling(handler, body, max_tokens, field)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    def final(result: GenerationResult) -> list[dict[str, Any]]:
        events = [chunk({}, result.finish_reason)]
        if _include_usage(body):
            events.append({**chunk({}, None), "choices": [], "usage": _usage(result).model_dump()})
        return events

    def answer(result: GenerationResult) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            id=rid, created=created, model=body.model, usage=_usage(result),
            choices=[ChatChoice(message=AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
        )

    formats = Formats(body=answer, delta=lambda text: [chunk({"content": text}, None)], result=final,
                      head=[chunk({"role": "assistant", "content": ""}, None)])
    return await handler.serve(request, adapter_set, params, prompt_ids, bool(body.stream), formats)
