"""POST /generate: the native generation route, one adapter, a combined weighted set or the base model."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from ...deps import GenerationDep, ReaderDep
from ...errors import InvalidRequestError
from ...protocol import (
    GENERATION_ERRORS,
    CombinationType,
    GenerateBody,
    GenerateDelta,
    GenerateResponse,
    GenerateResult,
    sse_content,
)
from ...types import GenerationResult
from ..serving import Formats

router = APIRouter(tags=["generate"])


def result_body(result: GenerationResult, combination: str) -> dict[str, Any]:
    return GenerateResponse(
        text=result.text,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        finish_reason=result.finish_reason,
        adapters=result.adapters,
        combination=combination,
        merge=combination,
        timings=vars(result.timings),
    ).model_dump()


def one_combination(**given: str | None) -> str | None:
    """The combination, given at most once (a query or body field, under its name or its old name `merge`)."""
    values = {v for v in given.values() if v}
    if len(values) > 1:
        named = ", ".join(f"{k}={v}" for k, v in given.items() if v)
        raise InvalidRequestError(f"combination given twice and differently ({named}); give it once")
    return values.pop() if values else None


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={**GENERATION_ERRORS, 200: {"content": sse_content(GenerateDelta, GenerateResult),
                                          "description": "JSON, or server-sent events when stream=true."}},
)
async def generate(
    request: Request, body: GenerateBody, _: ReaderDep, handler: GenerationDep,
    adapter: Annotated[str | None, Query(min_length=1, description="One adapter: boolq or boolq@3.")] = None,
    adapters: Annotated[
        str | None, Query(min_length=1, description="A weighted set: boolq:0.6,piqa:0.4; it must name an adapter.")
    ] = None,
    combination: Annotated[CombinationType | None, Query(
        description="How a weighted set is combined (PEFT's combination_type): linear (default) or ties.")] = None,
    merge: Annotated[CombinationType | None, Query(description="The old name of `combination`.")] = None,
) -> Any:
    """Generate text. Without an adapter the base model answers; an unknown adapter is a 404.

    With stream=true the answer is server-sent events: `{"type": "delta", "text"}` per piece of text, then
    `{"type": "result", ...}` with the same fields as the JSON answer, then `[DONE]`.
    """
    chosen = one_combination(combination=combination, merge=merge, body_combination=body.combination,
                             body_merge=body.merge)
    adapter_set = handler.native_set(adapter, adapters, body.adapters, chosen)
    params = handler.sampling(body.max_new_tokens, body.temperature, body.top_p, body.seed, body.stop,
                              ignore_eos=body.ignore_eos)
    prompt_ids = handler.encode(prompt=body.prompt, messages=body.messages)

    def body_of(result: GenerationResult) -> dict[str, Any]:
        return result_body(result, adapter_set.combination)

    formats = Formats(body=body_of, delta=lambda text: [{"type": "delta", "text": text}],
                      result=lambda result: [{"type": "result", **body_of(result)}])
    return await handler.serve(request, adapter_set, params, prompt_ids, body.stream, formats)
