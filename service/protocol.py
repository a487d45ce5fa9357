"""Request and response bodies of the HTTP API, native and OpenAI-compatible, in one place.

Static limits live in the field constraints; limits that depend on Settings (max_new_tokens, adapters per
request) are checked in service.adapter_service.check_limits so they answer with the same 422 shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MergeKind = Literal["linear", "ties"]


class ErrorDetail(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. adapter_not_found.")
    message: str = Field(description="What went wrong and what to change.")
    type: str = Field(description="Same as code; OpenAI clients read this field.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


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
    name: str = Field(description="Adapter name, optionally pinned to a version: boolq or boolq@3.")
    weight: float = Field(1.0, allow_inf_nan=False, ge=-100, le=100)


class GenerateBody(BaseModel):
    """POST /generate. Give either `prompt` or `messages`."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | None = Field(None, description="Plain text prompt, tokenised as is.")
    messages: list[ChatMessage] | None = Field(None, description="Chat messages; the chat template is applied.")
    max_new_tokens: int | None = Field(None, ge=1, description="Default: SHIRA_DEFAULT_MAX_NEW_TOKENS.")
    temperature: float = Field(0.0, ge=0.0, le=5.0, allow_inf_nan=False, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(None, description="Stop strings; the text ends before them.")
    stream: bool = Field(False, description="Stream server-sent events: one per text delta, then the result.")
    adapters: list[AdapterWeight] | None = Field(None, description="Weighted set; or use ?adapter= / ?adapters=.")
    merge: MergeKind | None = Field(None, description="How weighted sets are fused (default linear).")

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateBody:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_stop(value)


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
    merge: str
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

    model: str = Field(description="An adapter (boolq, boolq@2), 'base', or a weighted set boolq:0.6+piqa:0.4.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False, description="Default 1.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="Only n=1 is supported.")

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> str | list[str] | None:
        return _check_stop(value)


class CompletionBody(_OpenAISampling):
    prompt: str | list[str] = Field(description="A string, or a list holding exactly one string.")

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"exactly one prompt per request is supported, got {len(value)}")
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


def _check_stop(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else (value or [])
    if len(stops) > 16:
        raise ValueError(f"at most 16 stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    return value
