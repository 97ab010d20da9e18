"""The HTTP API's schema: request/response bodies (the OpenAPI page) and the JSON error shape."""

from __future__ import annotations

import dataclasses
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ..config import GenerateConfig

BOUNDS: dict[str, tuple[float, float]] = {
    "temperature": (0.01, 100.0), "top_p": (0.001, 1.0), "length_penalty": (-10.0, 10.0), "seed": (0, 2**63 - 1)}
"""Accepted range of each numeric option whose limit is not a server setting (checked by routes, both ends
included; NaN and infinities are refused). A tiny temperature overflows the scaled logits to NaN; a seed
must fit the random generator's 64 bits after `seed + k` for input k."""


class ApiError(Exception):
    """An error answered as `{"error": {"type", "message"}}` with an HTTP status."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # a message may quote the request, which JSON can give lone surrogates that UTF-8 cannot encode
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status, headers=headers)


def _range(name: str) -> str:
    low, high = BOUNDS[name]
    return f" {low} to {high}."


# --- request and response bodies (the OpenAPI schema) ------------------------------------------------
class GenerateRequest(BaseModel):
    """One task, one input or a list of inputs, and decoding options (default: greedy)."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="Name of a loaded task (GET /v1/tasks).", examples=["e2e"])
    input: str | list[str] = Field(description="A source text, or a list of them (one output each, in order).")
    max_new_tokens: int | None = Field(None, description="Tokens to generate at most (default and cap: server settings).")
    min_new_tokens: int = Field(0, description="The end-of-text token is blocked before this many tokens.")
    num_beams: int = Field(1, description="1: greedy or sampling (streamable); more: beam search (at most the "
                           "server's max_beams, and inputs x num_beams at most its max_lanes_per_request).")
    do_sample: bool = Field(False, description="Sample (with num_beams=1) instead of greedy decoding.")
    temperature: float = Field(1.0, description="Sampling temperature," + _range("temperature"))
    top_p: float = Field(1.0, description="Nucleus sampling threshold," + _range("top_p"))
    block_newlines: bool = Field(True, description="Forbid tokens containing a newline (the paper's decoding).")
    length_penalty: float = Field(1.0, description="Beam search length penalty," + _range("length_penalty"))
    seed: int | None = Field(None, description="Sampling seed; input k of the list samples with seed + k;"
                             + _range("seed"))
    stream: bool = Field(False, description="Answer with server-sent events: token deltas, then the full result.")


DECODING_FIELDS = tuple(name for name in GenerateRequest.model_fields
                        if name in {f.name for f in dataclasses.fields(GenerateConfig)} and name != "max_new_tokens")
"""Request fields that are GenerateConfig fields (max_new_tokens is resolved against server limits first)."""
_unknown = set(GenerateRequest.model_fields) - set(DECODING_FIELDS) - {"task", "input", "stream", "max_new_tokens"}
if _unknown:  # a decoding option added to the schema must exist in GenerateConfig, where options are declared
    raise TypeError(f"GenerateRequest fields {sorted(_unknown)} are not GenerateConfig fields")


class Output(BaseModel):
    text: str
    input_tokens: int = Field(description="Prompt tokens (the input in the task's text format).")
    output_tokens: int = Field(description="Generated tokens, the end-of-text token included.")
    finish_reason: Literal["stop", "length"] = Field(description="stop: end-of-text; length: max_new_tokens reached.")


class Timing(BaseModel):
    queue_ms: float = Field(description="Longest wait of the request's rows before decoding started.")
    total_ms: float = Field(description="Time from request arrival to the answer.")


class GenerateResponse(BaseModel):
    task: str
    outputs: list[Output]
    timing: Timing


class TaskInfo(BaseModel):
    name: str
    prefix_length: int
    num_parameters: int
    source: str = Field(description="Where the prefix came from, without server paths: 'prefix_dir/NAME' (the "
                        "prefix directory), 'file' (a --prefix NAME=PATH given at start) or '' (added in memory).")


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class ErrorDetail(BaseModel):
    type: str = Field(description="Machine-readable kind, e.g. unknown_task, input_too_long, queue_full.")
    message: str = Field(description="What was wrong, with the offending value.")


class ErrorBody(BaseModel):
    error: ErrorDetail


ERRORS = {code: {"model": ErrorBody, "description": text} for code, text in {
    400: "Invalid request (bad JSON, bad options, input too long, invalid task name).",
    401: "Missing or wrong API key.", 404: "Unknown task.", 413: "Request body too large.",
    422: "Body does not match the schema.", 429: "Queue full: retry after Retry-After seconds.",
    504: "Request timed out; its work was cancelled."}.items()}
