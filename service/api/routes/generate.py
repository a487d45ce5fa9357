"""POST /generate: the native generation route, one adapter, a fused weighted set or the base model."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from ...deps import EngineDep, ReaderDep, SettingsDep
from ...errors import InvalidRequestError
from ...generation import GenerationResult
from ...protocol import (
    ErrorResponse,
    GenerateBody,
    GenerateDelta,
    GenerateResponse,
    GenerateResult,
    MergeKind,
    sse_content,
)
from .. import requests as build
from ..streaming import open_stream, sse_response, until_disconnect

router = APIRouter(tags=["generate"])
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 422, 503)}


def result_body(result: GenerationResult, merge: str) -> dict[str, Any]:
    return GenerateResponse(
        text=result.text,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
        adapters=result.adapters,
        merge=merge,
        timings=vars(result.timings),
    ).model_dump()


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**_ERRORS, 200: {"content": sse_content(GenerateDelta, GenerateResult),
                                "description": "JSON, or server-sent events when stream=true."}},
)
async def generate(
    request: Request, body: GenerateBody, _: ReaderDep, engine: EngineDep, settings: SettingsDep,
    adapter: Annotated[str | None, Query(min_length=1, description="One adapter: boolq or boolq@3.")] = None,
    adapters: Annotated[
        str | None, Query(min_length=1, description="A weighted set: boolq:0.6,piqa:0.4; it must name an adapter.")
    ] = None,
    merge: Annotated[MergeKind | None, Query(description="Fusion of a weighted set: linear (default) or ties.")] = None,
) -> Any:
    """Generate text. Without an adapter the base model answers; an unknown adapter is a 404.

    With stream=true the answer is server-sent events: `{"type": "delta", "text"}` per piece of text, then
    `{"type": "result", ...}` with the same fields as the JSON answer, then `[DONE]`.
    """
    if merge and body.merge and merge != body.merge:
        raise InvalidRequestError(f"merge given twice and differently: ?merge={merge}, body merge={body.merge}")
    adapter_set = build.native_set(adapter, adapters, body.adapters, merge or body.merge, settings)
    params = build.sampling(settings, body.max_new_tokens, body.temperature, body.top_p, body.seed, body.stop)
    prompt_ids = build.encode(engine, prompt=body.prompt, messages=body.messages)
    gen = await build.prepare(engine, prompt_ids, params, adapter_set, request.state)
    if body.stream:
        first, stream = await open_stream(engine, gen)
        return sse_response(
            first, stream,
            on_delta=lambda text: [{"type": "delta", "text": text}],
            on_result=lambda result: [{"type": "result", **result_body(result, gen.adapters.merge)}],
        )
    result = await until_disconnect(request, engine.generate(gen))
    if not isinstance(result, GenerationResult):
        return result  # the client is gone
    return result_body(result, gen.adapters.merge)
