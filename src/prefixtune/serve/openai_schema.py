"""Bodies of the OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions) and
OpenAI's error shape `{"error": {"message", "type", "param", "code"}}`.

Requests accept OpenAI's fields and prefixtune's decoding extras (`num_beams`, `block_newlines`,
`min_tokens`, `length_penalty`, sent by the `openai` client as `extra_body`); unknown fields are refused.
OpenAI fields this server does not implement are accepted only at their no-op value (`UNSUPPORTED`), so a
client that sends them explicitly learns that they are ignored instead of getting a silently different
answer.
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .schema import ERRORS as NATIVE_ERRORS


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and no choices) before [DONE].")


class _Decoding(BaseModel):
    """The fields completions and chat completions share."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="A task name (GET /v1/models), or the base model's id for no prefix.")
    max_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most (default and cap: the "
                                   "server's default_new_tokens / max_new_tokens).")
    temperature: float | None = Field(None, ge=0, le=2, description="0: greedy; above 0: sampling at this "
                                      "temperature; unset: 1 (sampling), or greedy beam search with num_beams > 1.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    n: int = Field(1, ge=1, description="Choices per prompt; choice k of a request samples with seed + k.")
    stop: str | list[str] | None = Field(None, description="Up to 4 strings; the text ends before the first one "
                                         "generated (finish_reason 'stop').")
    seed: int | None = Field(None, description="Sampling seed (choice k uses seed + k, as input k of /v1/generate).")
    stream: bool = Field(False, description="Answer as server-sent events `data: {chunk}`, then `data: [DONE]`.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="An end-user id; written to the JSON request log.")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # prefixtune's extras (GenerateConfig fields)
    num_beams: int = Field(1, description="prefixtune: beam search with this many beams (not with n > 1 or stream).")
    block_newlines: bool | None = Field(None, description="prefixtune: forbid tokens containing a newline "
                                        "(default: true for completions, as /v1/generate; false for chat).")
    min_tokens: int = Field(0, ge=0, description="prefixtune: the end-of-text token is blocked before this many tokens.")
    length_penalty: float = Field(1.0, description="prefixtune: beam search length penalty.")


class CompletionRequest(_Decoding):
    prompt: str | list[str] = Field(description="A text, or a list of texts (n choices each, in order).")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = Field(description="Only text parts are served.")
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Decoding):
    messages: list[ChatMessage] = Field(min_length=1, description="Rendered with the tokenizer's chat template.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens (wins if both).")
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None


UNSUPPORTED = {"echo": False, "logprobs": (None, False), "best_of": (None, 1), "suffix": None,
               "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": (None, {}), "top_logprobs": None,
               "tools": (None, []), "response_format": None}
"""OpenAI fields that are not implemented -> the values (one or a tuple of them) that mean 'not used'."""


# --- responses ------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int = Field(description="Prompt tokens, each prompt counted once (not once per choice).")
    completion_tokens: int = Field(description="Generated tokens of all choices, end-of-text included.")
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
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
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the prefix was saved (the base model: when the server started).")
    owned_by: str = "prefixtune"
    root: str = Field(description="The base model's id.")
    parent: str | None = Field(description="The base model's id for a task; null for the base model.")
    prefix_length: int | None = Field(description="Prefix length of a task; null for the base model.")
    num_parameters: int | None = Field(description="Parameters of a task's prefix; null for the base model.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="What was wrong, with the offending value.")
    type: str = Field(description="invalid_request_error, authentication_error, rate_limit_error or server_error.")
    param: str | None = Field(description="The request field at fault, when one is.")
    code: str = Field(description="prefixtune's error kind, e.g. model_not_found, invalid_request, queue_full.")


class OpenAIErrorBody(BaseModel):
    error: OpenAIErrorDetail


ERRORS = {code: {**entry, "model": OpenAIErrorBody} for code, entry in NATIVE_ERRORS.items() if code != 422}
"""The native routes' error statuses in OpenAI's shape; a body that does not match the schema gets 400 here."""


def error_type(status: int) -> str:
    """OpenAI's error `type` for an HTTP status."""
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers)
