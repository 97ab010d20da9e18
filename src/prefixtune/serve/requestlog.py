"""One record per generation request: counted in the metrics and, with `--log-format json`, logged as
one JSON line (task, route, status, tokens, latency).

`RequestLog` is the outermost ASGI middleware, so it also sees the refusals of the auth/size gate. The
route code fills the current request's `Record` (task, tokens, error type) through `current()`, a
context variable set for the whole request, streamed body included.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from dataclasses import asdict, dataclass, field

from .metrics import Metrics

ROUTES = frozenset({"/v1/generate", "/v1/completions", "/v1/chat/completions"})
"""Paths whose requests are recorded (the generation routes)."""

logger = logging.getLogger("prefixtune.serve.requests")
"""Where the JSON lines go (cli_main gives it a plain stderr handler with --log-format json)."""

_ERROR_BODY_LIMIT = 1 << 16
"""Bytes of an error response read to find its error type; error bodies are small JSON objects."""


@dataclass
class Record:
    """What one request did; the route code fills in what only it knows."""

    route: str
    task: str = ""
    """A resolved task (or the base model's id); empty while unknown, so made-up names never become labels."""
    status: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    error: str = ""
    """Error type of a failed request, or of a stream that failed after it started."""
    user: str | None = None
    """The OpenAI `user` field, when a request gives one."""
    start: float = field(default_factory=time.monotonic)


_CURRENT: contextvars.ContextVar[Record | None] = contextvars.ContextVar("prefixtune_request", default=None)


def current() -> Record | None:
    """The record of the request being handled in this context (None outside a recorded route)."""
    return _CURRENT.get()


class RequestLog:
    """ASGI middleware: a `Record` per generation request, counted (and logged as JSON) when it ends."""

    def __init__(self, app, metrics: Metrics, log_json: bool):
        self.app, self.metrics, self.log_json = app, metrics, log_json

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in ROUTES:
            return await self.app(scope, receive, send)
        record = Record(route=scope["path"])
        token = _CURRENT.set(record)
        error_body = bytearray()

        async def recording_send(message):
            if message["type"] == "http.response.start":
                record.status = message["status"]
            elif message["type"] == "http.response.body" and record.status >= 400:
                error_body.extend(message.get("body", b"")[: _ERROR_BODY_LIMIT - len(error_body)])
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            _CURRENT.reset(token)
            if record.status >= 400 and not record.error:
                record.error = _error_type(bytes(error_body), record.status)
            self._finish(record)

    def _finish(self, record: Record) -> None:
        status = record.status or 500  # the app raised before answering
        self.metrics.requests.labels(record.route, record.task, str(status)).inc()
        if record.error:
            self.metrics.errors.labels(record.route, record.task, record.error).inc()
        if self.log_json:
            line = {k: v for k, v in asdict(record).items() if k != "start" and v not in (None, "")}
            line.update(status=status, latency_ms=round(1000 * (time.monotonic() - record.start), 1))
            logger.info(json.dumps(line, ensure_ascii=False))


def _error_type(body: bytes, status: int) -> str:
    """The `code` (OpenAI shape) or `type` (native shape) of an error body; `http_<status>` if it has neither."""
    try:
        error = json.loads(body)["error"]
        return str(error.get("code") or error["type"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"http_{status}"
