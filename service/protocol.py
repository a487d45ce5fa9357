"""Request and response bodies of the HTTP API, native and OpenAI-compatible, in one place.

Static limits live in the field constraints, so the OpenAPI schema states them; limits that depend on Settings
(max_new_tokens, adapters per request) are checked by service.validation, for the HTTP layer and the engine
alike, and answer with the same 422 shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CombinationType = Literal["linear", "ties"]  # PEFT's combination_type names
MIN_TEMPERATURE = 0.01  # below it, logits / temperature overflow; 0 is greedy
MAX_STOP_STRINGS = 16


# The validators below give the messages; these schema parts say the same rules in the OpenAPI document.
_NOT_TINY_TEMPERATURE = {"not": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": MIN_TEMPERATURE}}
_STOP_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP_STRINGS},
    {"type": "null"},
]}
_PROMPT_SCHEMA = {"anyOf": [
    {"type": "string", "minLength": 1},
    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
]}


def _check_temperature(value: float | None) -> float | None:
    if value is not None and 0 < value < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, got {value}")
    return value


def _check_stop(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else (value or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return value


IGNORE_EOS = ("Keep decoding past the end-of-sequence token until the token limit (vLLM's name), so that load tests "
              "measure a fixed number of tokens.")


def _stop_field() -> Any:
    return Field(None, description=f"Stop strings (at most {MAX_STOP_STRINGS}, none empty); the text ends before "
                 "them.", json_schema_extra=_STOP_SCHEMA)


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. adapter_not_found.")
    message: str = Field(description="What went wrong and what to change.")
    type: str = Field(description="Same as code; OpenAI clients read this field.")
    details: list[dict[str, Any]] | None = Field(
        None, description="validation_error only: one {loc, msg, type} per refused field."
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` entry for error statuses, all in the one ErrorResponse shape."""
    return {status: {"model": ErrorResponse} for status in statuses}


GENERATION_ERRORS = error_responses(400, 401, 403, 404, 413, 422, 500, 503)
ADAPTER_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 422, 503)


# --- adapters -------------------------------------------------------------------------------------------


class AdapterInfo(BaseModel):
    """One stored version of an adapter (service.registry.AdapterRecord)."""

    name: str
    version: int
    sha256: str
    base_fingerprint: str
    nnz: int
    density: float
    bytes: int
    layers: int
    mask: str
    description: str
    created: float


class AdapterUploaded(AdapterInfo):
    created_version: bool = Field(description="False when identical bytes were already the latest version.")


class AdapterDetail(AdapterInfo):
    versions: list[AdapterInfo] = Field(description="Every stored version, oldest first.")


class AdapterList(BaseModel):
    adapters: list[AdapterInfo]
    total: int
    offset: int
    limit: int


class AdapterDeleted(BaseModel):
    name: str
    deleted_versions: list[int]


# --- native generation ----------------------------------------------------------------------------------


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message text; OpenAI content parts of type 'text' are joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"only text content parts are supported, got type {part.get('type')!r}")
            parts.append(part["text"])
        return "".join(parts)


class AdapterWeight(BaseModel):
    name: str = Field(min_length=1, description="Adapter name, optionally pinned to a version: boolq or boolq@3.")
    weight: float = Field(1.0, allow_inf_nan=False, ge=-100, le=100)


class GenerateBody(BaseModel):
    """POST /generate. Give either `prompt` or `messages`."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
    ]})

    prompt: str | None = Field(None, min_length=1, description="Plain text prompt, tokenised as is.")
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="Chat messages; the chat template is applied."
    )
    max_new_tokens: int | None = Field(None, ge=1, description="Default: SHIRA_DEFAULT_MAX_NEW_TOKENS.")
    temperature: float = Field(
        0.0, ge=0.0, le=5.0, allow_inf_nan=False, json_schema_extra=_NOT_TINY_TEMPERATURE,
        description=f"0 means greedy; otherwise at least {MIN_TEMPERATURE}.",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = _stop_field()
    ignore_eos: bool = Field(False, description=IGNORE_EOS)
    stream: bool = Field(False, description="Stream server-sent events: one per text delta, then the result.")
    adapters: list[AdapterWeight] | None = Field(
        None, description="Weighted set; or use ?adapter= / ?adapters=. Empty or left out: the base model."
    )
    combination: CombinationType | None = Field(
        None, description="How a weighted set is combined (PEFT's combination_type): linear (default) or ties.",
    )
    merge: CombinationType | None = Field(None, description="The old name of `combination`, still accepted.")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    _temperature = field_validator("temperature")(_check_temperature)
    _stop = field_validator("stop")(_check_stop)


class TimingsOut(BaseModel):
    queue_ms: float
    switch_ms: float
    generate_ms: float


class AdapterUsed(BaseModel):
    name: str
    version: int
    weight: float


class GenerateResponse(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    adapters: list[AdapterUsed] = Field(description="The resolved set, versions pinned; [] for the base model.")
    combination: str = Field(description="How the set was combined: linear or ties.")
    merge: str = Field(description="The same as `combination`, under its old name.")
    timings: TimingsOut


# --- OpenAI-compatible ----------------------------------------------------------------------------------


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _OpenAISampling(BaseModel):
    """Fields shared by completions and chat completions. Unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(
        min_length=1,
        description="An adapter (boolq, boolq@2), 'base' (or the model's label), or a weighted set "
        "boolq:0.6+piqa:0.4. A set that names no adapter (such as '+') is refused.",
    )
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, allow_inf_nan=False, json_schema_extra=_NOT_TINY_TEMPERATURE,
        description=f"Default 1; 0 means greedy, otherwise at least {MIN_TEMPERATURE}.",
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = _stop_field()
    ignore_eos: bool = Field(False, description=IGNORE_EOS)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="Only n=1 is supported.")

    _temperature = field_validator("temperature")(_check_temperature)
    _stop = field_validator("stop")(_check_stop)


class CompletionBody(_OpenAISampling):
    prompt: str | list[str] = Field(
        description="A non-empty string, or a list holding exactly one (one prompt per request).",
        json_schema_extra=_PROMPT_SCHEMA,
    )

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"exactly one prompt per request is supported, got {len(value)}")
        if not (value if isinstance(value, str) else value[0]):
            raise ValueError("the prompt is empty; send at least one character")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatCompletionBody(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage



# --- server-sent events ---------------------------------------------------------------------------------


class GenerateDelta(BaseModel):
    """POST /generate with stream=true: one event per piece of text."""

    type: Literal["delta"]
    text: str


class GenerateResult(GenerateResponse):
    """POST /generate with stream=true: the last event before [DONE], the JSON answer's fields."""

    type: Literal["result"]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One streamed chat event; the usage event (stream_options.include_usage) has no choices."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


# Models the event schemas below refer to; service.main adds them to the document's components.
STREAM_EVENT_MODELS = (GenerateDelta, GenerateResult, CompletionResponse, ChatCompletionChunk, ErrorResponse)


def sse_content(*events: type[BaseModel]) -> dict[str, Any]:
    """The text/event-stream entry of a 200 answer: each event's data is one of `events` as JSON, an
    ErrorResponse when generation fails after the stream started, or the final "[DONE]"."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (*events, ErrorResponse)]}
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "string", "anyOf": [
                {"const": "[DONE]"},
                {"contentMediaType": "application/json", "contentSchema": payload},
            ]},
        },
    }
    return {"text/event-stream": {"schema": event}}
