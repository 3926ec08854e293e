"""The wire format: pydantic models of the OpenAI API subset `tunelab serve` speaks.

Fields are declared in the order of OpenAI's API reference, so a reader can hold this file next to the docs.
Unknown request fields are ignored (as vLLM does), so clients that send newer options keep working; options
that would change the output and that we do not implement (tools, logit_bias, penalties, ...) are rejected
with a 400 that names the field, rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class OpenAIModel(BaseModel):
    """Base of every request model: unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------
class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers every error."""

    error: ErrorInfo


# --------------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------------
class StreamOptions(OpenAIModel):
    include_usage: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


StopField = Annotated[Union[str, list[str], None], Field(
    None, description="Up to 16 strings; generation stops before the first one and it is not returned.")]


def _stop_list(v: str | list[str] | None) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else list(v)
    if len(items) > 16:
        raise ValueError("at most 16 stop sequences are supported")
    if any(s == "" for s in items):
        raise ValueError("stop sequences must not be empty strings")
    return items


class _SamplingFields(OpenAIModel):
    """Fields shared by chat and text completions (each class re-orders them as OpenAI's docs do)."""

    @field_validator("frequency_penalty", "presence_penalty", check_fields=False)
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0, 0.0):
            raise ValueError("penalties are not supported by this server; omit the field or send 0")
        return v

    @field_validator("logit_bias", check_fields=False)
    @classmethod
    def _no_logit_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @field_validator("stop", check_fields=False)
    @classmethod
    def _check_stop(cls, v):
        _stop_list(v)
        return v

    @property
    def stop_list(self) -> list[str]:
        return _stop_list(getattr(self, "stop", None))


# --------------------------------------------------------------------------------------------------
# chat completions
# --------------------------------------------------------------------------------------------------
class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_template_message(self) -> dict:
        """The plain ``{"role", "content"}`` dict a chat template expects (``developer`` counts as system)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ResponseFormat(OpenAIModel):
    type: Literal["text"] = Field("text", description="only plain text is supported")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    model: str
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool = Field(False, description="return the log probability of each output token")
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI in favour of max_completion_tokens")
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: StopField
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = Field(None, description="only allowed with tools (not supported)")
    top_logprobs: int | None = Field(None, ge=0, le=20)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tool calling is not supported by this server")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(cls, v, info):
        if v is not None and not info.data.get("tools"):  # as OpenAI answers it
            raise ValueError("'tool_choice' is only allowed when 'tools' are specified")
        return v

    @model_validator(mode="after")
    def _check(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The field the request set its limit with (errors name it)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    choices: list[ChatChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    system_fingerprint: str | None = None
    usage: Usage


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    choices: list[ChatChunkChoice]
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | None = None


# --------------------------------------------------------------------------------------------------
# (legacy) completions
# --------------------------------------------------------------------------------------------------
class CompletionRequest(_SamplingFields):
    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, a list of strings, a list of token ids, or a list of token-id lists")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 (or omitted) is supported")
    echo: bool = False
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(16, ge=0)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float | None = None
    seed: int | None = None
    stop: StopField
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    user: str | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v):
        if v:
            raise ValueError("suffix (insertion) is not supported by this server")
        return v

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @model_validator(mode="after")
    def _check(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 is only allowed with echo: true (to score a prompt)")
        return self


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    finish_reason: Literal["stop", "length"] | None
    index: int
    logprobs: CompletionLogprobs | None = None
    text: str


class Completion(BaseModel):
    id: str = Field(default_factory=lambda: _id("cmpl"))
    choices: list[CompletionChoice]
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    object: Literal["text_completion"] = "text_completion"
    system_fingerprint: str | None = None
    usage: Usage | None = None


# --------------------------------------------------------------------------------------------------
# models, health, admin
# --------------------------------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    created: int
    object: Literal["model"] = "model"
    owned_by: str = "tunelab"
    root: str | None = Field(None, description="the base model's id")
    parent: str | None = Field(None, description="for an adapter: the base model it applies to")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    model: str
    adapters: int = Field(description="registered adapters")
    loaded_adapters: int = Field(description="adapters currently loaded (LRU-bounded)")
    running: int = Field(description="sequences in the decode batch")
    waiting: int = Field(description="requests queued for a batch slot")
    active_requests: int = Field(description="prompts in flight (a completions request counts each of its "
                                             "prompts)")
    active_sequences: int = Field(0, description="sequences in flight: prompts times n, counted against "
                                                 "--max-concurrent")
    dtype: str = Field("float32", description="what the model computes in: float32, or bfloat16 / float16 "
                                              "(autocast)")
    deterministic: bool = Field(True, description="true in float32: a sequence's greedy output and "
                                                  "log-likelihoods do not depend on the other sequences in its "
                                                  "batch; false in half precision, where they may")


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$",
                      description="the model name clients will send")
    path: str = Field(min_length=1, description="a PEFT LoRA adapter directory on the server's disk")
