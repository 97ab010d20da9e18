"""POST /v1/generate: validation of one request, its rows in the batcher, the answer in one piece or as
server-sent events (`event: token|done|error`). Timeouts, client disconnects and closed streams cancel
the request's rows in the batcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from ..config import GenerateConfig
from ..decoding import encode_sources
from ..multi import MultiPrefixModel, NamedPrefix
from .metrics import Metrics
from .admission import submit
from .rows import Row
from .scheduler import Batcher
from .schema import BOUNDS, DECODING_FIELDS, ApiError, GenerateRequest, GenerateResponse, Output, Timing
from .settings import TASK_NAME, ServeSettings


class GenerateRoute:
    """POST /v1/generate: validate, tokenize, queue the rows, then answer in one piece or as a stream."""

    def __init__(self, multi: MultiPrefixModel, settings: ServeSettings, batcher: Batcher, metrics: Metrics):
        self.multi, self.settings, self.batcher, self.metrics = multi, settings, batcher, metrics

    async def handle(self, body: GenerateRequest, request: Request):
        start = time.monotonic()
        config = self._config(body)
        task = self._task(body.task)
        inputs = [body.input] if isinstance(body.input, str) else body.input
        if not 1 <= len(inputs) <= self.settings.max_inputs_per_request:
            raise ApiError(400, "invalid_request", f"input has {len(inputs)} items; give 1 to "
                           f"{self.settings.max_inputs_per_request}")
        lanes, most = len(inputs) * config.num_beams, self.settings.max_lanes_per_request
        if lanes > most:
            raise ApiError(400, "invalid_request", f"{len(inputs)} inputs x num_beams {config.num_beams} = {lanes} "
                           f"batch lanes; this server takes at most {most} per request: send fewer inputs or beams")
        queue: asyncio.Queue = asyncio.Queue()
        rows = await self.rows(inputs, task, config, body, queue)
        submit(self.batcher, rows, self.settings.retry_after_s)
        events = self._events(rows, queue, start, None if body.stream else request)
        if body.stream:
            return StreamingResponse(self._sse(body.task, rows, events, start), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        done: dict[int, dict] = {}
        async with contextlib.aclosing(events):
            async for index, kind, data in events:
                if kind == "error":
                    raise ApiError(500, "generation_failed", data["message"])
                done[index] = data
        if len(done) < len(rows):
            raise ApiError(499, "client_closed", "the client disconnected; the request's work was cancelled")
        return self._response(body.task, [done[i] for i in range(len(rows))], start)

    def _config(self, body: GenerateRequest) -> GenerateConfig:
        limit = self.settings.max_new_tokens
        new = self.settings.default_new_tokens if body.max_new_tokens is None else body.max_new_tokens
        if new > limit:
            raise ApiError(400, "invalid_request", f"max_new_tokens {new} exceeds this server's limit of {limit}")
        for name, (low, high) in BOUNDS.items():
            value = getattr(body, name)
            if value is not None and not low <= value <= high:  # NaN and infinities fail the comparison too
                raise ApiError(400, "invalid_request", f"{name} must be in [{low}, {high}], got {value!r}")
        if body.num_beams > self.settings.max_beams:
            raise ApiError(400, "invalid_request", f"num_beams {body.num_beams} exceeds this server's limit of "
                           f"{self.settings.max_beams}")
        # every decoding field of the request body is a GenerateConfig field of the same name (schema.py)
        config = GenerateConfig(**{name: getattr(body, name) for name in DECODING_FIELDS}, max_new_tokens=new)
        try:
            config.validate()
        except ValueError as err:
            raise ApiError(400, "invalid_request", str(err)) from None
        if config.do_sample and config.num_beams > 1:
            raise ApiError(400, "invalid_request", f"do_sample with num_beams={config.num_beams} is not served: "
                           "its output would depend on the other rows of the batch; use num_beams=1")
        if body.stream and not self.batcher.stepwise(config):
            raise ApiError(400, "invalid_request", f"stream=true needs num_beams=1 (got {config.num_beams}) "
                           "and a decoder-only model")
        return config

    def _task(self, name: str) -> NamedPrefix:
        if not TASK_NAME.fullmatch(name):
            raise ApiError(400, "invalid_task_name", f"invalid task name {name!r}")
        task = self.multi.tasks().get(name)
        if task is None:
            raise ApiError(404, "unknown_task", f"unknown task {name!r}; loaded tasks: {sorted(self.multi.tasks())}")
        return task

    async def rows(self, inputs: list[str], task: NamedPrefix, config: GenerateConfig, body: GenerateRequest,
                   queue: asyncio.Queue) -> list[Row]:
        """The request's rows; inputs are tokenized in a worker thread, so a long one never stalls the event loop."""
        prompts = await run_in_threadpool(lambda: [self._prompt(i, text, task) for i, text in enumerate(inputs)])
        return [self._make_row(i, prompt, task, config, body, queue) for i, prompt in enumerate(prompts)]

    def _row(self, index: int, text: str, task: NamedPrefix, config: GenerateConfig, body: GenerateRequest,
             queue: asyncio.Queue) -> Row:
        """One row, tokenized on the calling thread (`rows` does a whole request off the event loop)."""
        return self._make_row(index, self._prompt(index, text, task), task, config, body, queue)

    def _prompt(self, index: int, text: str, task: NamedPrefix) -> list[int]:
        """Input `index` as prompt ids (the task's text format applied), or ApiError 400 saying what is wrong."""
        if not text.strip():
            raise ApiError(400, "invalid_request", f"input {index} is empty: every input needs some text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON can carry "\ud800"; no tokenizer can
            raise ApiError(400, "invalid_request", f"input {index} is not valid Unicode: lone surrogate "
                           f"{text[err.start]!r} at character {err.start}; send UTF-8 text") from None
        most, chars = self.settings.max_input_tokens, self.batcher.longest_token
        if len(text) > most * chars:  # cannot fit (unless a normalizer drops characters): refused before the work
            raise ApiError(400, "input_too_long", f"input {index} has {len(text)} characters, more than {most} "
                           f"tokens of at most {chars} characters each; this server accepts at most {most} tokens")
        with self.batcher.encoder_lock:
            ids, _ = encode_sources(self.batcher.encoder, self.multi.base, [text], [task.text_format])
        if ids.shape[1] > most:
            raise ApiError(400, "input_too_long", f"input {index} has {ids.shape[1]} tokens; this server accepts at "
                           f"most {most}")
        return ids[0].tolist()

    def _make_row(self, index: int, prompt: list[int], task: NamedPrefix, config: GenerateConfig, body: GenerateRequest,
                  queue: asyncio.Queue) -> Row:
        if config.seed is not None:
            config = dataclasses.replace(config, seed=config.seed + index)
        loop = asyncio.get_running_loop()
        emit = lambda kind, data: loop.call_soon_threadsafe(queue.put_nowait, (index, kind, data))  # noqa: E731
        return Row(task.name, task.prefix, prompt, config, emit, stream=body.stream)

    async def _events(self, rows: list[Row], queue: asyncio.Queue, start: float,
                      request: Request | None) -> AsyncIterator[tuple[int, str, dict]]:
        """The rows' events until each has ended; cancels what is left on timeout, disconnect or close."""
        deadline, pending = start + self.settings.request_timeout_s, len(rows)
        try:
            while pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(504, "timeout", f"request did not finish within {self.settings.request_timeout_s} s")
                try:
                    index, kind, data = await asyncio.wait_for(queue.get(), min(left, 0.5))
                except asyncio.TimeoutError:
                    if request is not None and await request.is_disconnected():
                        return
                    continue
                if kind != "token":
                    pending -= 1
                yield index, kind, data
        finally:
            self.batcher.cancel(rows)

    async def _sse(self, task: str, rows: list[Row], events: AsyncIterator, start: float) -> AsyncIterator[str]:
        done: dict[int, dict] = {}
        try:
            async for index, kind, data in events:
                if kind == "error":
                    yield _event("error", {"index": index, "type": "generation_failed", **data})
                    return
                if kind == "done":
                    done[index] = data
                else:
                    yield _event("token", {"index": index, **data})
        except ApiError as err:
            yield _event("error", {"type": err.kind, "message": err.message})
            return
        yield _event("done", self._response(task, [done[i] for i in range(len(rows))], start).model_dump())

    def _response(self, task: str, done: list[dict], start: float) -> GenerateResponse:
        elapsed = time.monotonic() - start
        self.metrics.observe(self.metrics.latency, elapsed)
        outputs = [Output(**{k: d[k] for k in Output.model_fields}) for d in done]
        timing = Timing(queue_ms=max(d["queue_ms"] for d in done), total_ms=1000 * elapsed)
        return GenerateResponse(task=task, outputs=outputs, timing=timing)


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"
