"""The HTTP API's schema: request/response bodies (the OpenAPI page) and the JSON error shape."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model

from ..config import GenerateConfig, field_docs

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
NOT_PER_REQUEST = {"bf16": "the server's precision (serve --bf16)", "batch_size": "the scheduler forms batches",
                   "early_stopping": "the server's beam search is always classic (True)"}
"""GenerateConfig fields a request cannot set, and why: every other field is a request field."""
REQUEST_DEFAULTS: dict[str, object] = {"num_beams": 1, "min_new_tokens": 0, "max_new_tokens": None}
"""Where a request's default differs from GenerateConfig's (the paper's beam 5 / min 5): greedy, no minimum,
and max_new_tokens from the server's settings."""
_NOTES = {
    "max_new_tokens": " Default and cap: the server's settings.",
    "num_beams": " More than 1 is at most the server's max_beams, and inputs x num_beams at most its "
                 "max_lanes_per_request; 1 is streamable.",
    "seed": " Input k of a list samples with seed + k.",
}
"""What the server adds to a field's GenerateConfig docstring (besides the BOUNDS range)."""


def decoding_fields(config_cls=GenerateConfig) -> dict[str, tuple]:
    """The request's decoding fields, for pydantic.create_model: (type, Field) from each GenerateConfig field
    not in NOT_PER_REQUEST, described by its docstring (declared once, in config.py) plus the server's notes."""
    docs, hints = field_docs(config_cls), typing.get_type_hints(config_cls)
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.name in NOT_PER_REQUEST:
            continue
        default = REQUEST_DEFAULTS.get(f.name, f.default)
        kind = hints[f.name] | None if default is None else hints[f.name]
        accepted = f" Accepted:{_range(f.name)}" if f.name in BOUNDS else ""
        out[f.name] = (kind, Field(default, description=docs.get(f.name, "") + _NOTES.get(f.name, "") + accepted))
    return out


GenerateRequest = create_model(
    "GenerateRequest", __config__=ConfigDict(extra="forbid"),
    __doc__="One task, one input or a list of inputs, and decoding options (default: greedy).",
    task=(str, Field(description="Name of a loaded task (GET /v1/tasks).", examples=["e2e"])),
    input=(str | list[str], Field(description="A source text, or a list of them (one output each, in order).")),
    **decoding_fields(),
    stream=(bool, Field(False, description="Answer with server-sent events: token deltas, then the full result.")),
)

DECODING_FIELDS = tuple(name for name in decoding_fields() if name != "max_new_tokens")
"""Request fields copied into the GenerateConfig a request decodes with (max_new_tokens is resolved against
the server's limits first)."""


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
