"""One path for every generation route: a GenerationHandler on app.state parses, validates once, submits, and
then streams or answers. Routes only read their fields and say how their answer is written (`Formats`).

The path: the adapter set (service.api.adapter_sets) and the sampling settings, checked by service.validation
-> the prompt's token ids (the engine's tokenizer and chat template) -> the set resolved to stored versions
(an unknown adapter is a 404, never the base model) -> the engine (service.engine) -> server-sent events, or
one JSON answer unless the client went away first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from .. import validation
from ..config import Settings
from ..errors import InvalidRequestError
from ..metrics import ADAPTER_REQUESTS
from ..protocol import AdapterWeight, ChatMessage
from ..types import AdapterSet, EngineAPI, GenerationRequest, GenerationResult, SamplingParams
from . import adapter_sets
from .streaming import open_stream, sse_response, until_disconnect


@dataclass
class Formats:
    """How a route writes its answer: the JSON body, or the SSE events of a stream."""

    body: Callable[[GenerationResult], Any]
    delta: Callable[[str], Iterable[dict[str, Any]]]
    result: Callable[[GenerationResult], Iterable[dict[str, Any]]]
    head: Iterable[dict[str, Any]] = ()


class GenerationHandler:
    """Serves generation requests for the routes.

    Args:
        engine: the running engine (service.engine.Engine, or a double with the same methods).
        settings: the server's settings (limits).
    """

    def __init__(self, engine: EngineAPI, settings: Settings) -> None:
        self.engine, self.settings = engine, settings

    def native_set(self, adapter: str | None, adapters: str | None, body: list[AdapterWeight] | None,
                   combination: str | None) -> AdapterSet:
        return adapter_sets.native_set(adapter, adapters, body, combination, self.settings)

    def model_set(self, model: str) -> AdapterSet:
        return adapter_sets.model_set(model, self.engine.model_label, self.settings)

    def sampling(self, max_new_tokens: int | None, temperature: float, top_p: float, seed: int | None,
                 stop: str | list[str] | None, field: str = "max_new_tokens",
                 ignore_eos: bool = False) -> SamplingParams:
        """Checked by service.validation.check_sampling (the engine's rules); over the token limit is a 422 that
        names the client's own field."""
        if max_new_tokens is None:  # a default above the limit is the operator's slip, not the client's
            max_new_tokens = min(self.settings.default_max_new_tokens, self.settings.max_new_tokens)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        params = SamplingParams(max_new_tokens, temperature, top_p, seed, stops, ignore_eos)
        return validation.check_sampling(params, self.settings.max_new_tokens, field)

    def encode(self, prompt: str | None = None, messages: list[ChatMessage] | None = None) -> list[int]:
        """Prompt ids from the engine's tokenizer; chat messages go through its chat template."""
        if messages is None:
            return self.engine.encode(prompt=prompt)
        try:
            plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e
        return self.engine.encode(messages=plain)

    async def serve(self, request: Request, adapters: AdapterSet, params: SamplingParams, prompt_ids: list[int],
                    stream: bool, formats: Formats) -> Any:
        """Resolves the set, submits the request, and streams or answers it."""
        resolved = await self.engine.resolve_set(adapters)
        request.state.adapter_label = adapter_sets.metric_label(resolved.pinned)
        for name in {r.name for r in resolved.pinned.refs}:
            ADAPTER_REQUESTS.labels(adapter=name).inc()
        gen = GenerationRequest(prompt_ids=prompt_ids, params=params, adapters=resolved.pinned, resolved=resolved)
        if stream:
            first, events = await open_stream(self.engine, gen)
            return sse_response(first, events, on_delta=formats.delta, on_result=formats.result, head=formats.head)
        result = await until_disconnect(request, self.engine.generate(gen))
        if not isinstance(result, GenerationResult):
            return result  # the client is gone
        return formats.body(result)
