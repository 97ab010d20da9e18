"""The OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

`model` picks the task (or the base model's id: no prefix). A request becomes the `GenerateRequest`
that /v1/generate would take for the same prompts and options, and goes through the same
`GenerateRoute` helpers (options, rows, queue, events) and the same batcher: an OpenAI request and the
equal /v1/generate request give identical text. Choice k (prompt k // n) is input k of that request,
so a seeded choice k samples with seed + k. Completions read the prompt through the task's text
format, as /v1/generate does; chat renders the messages with the tokenizer's chat template and uses
that text as the whole prompt (the template marks the turns), behind the task's prefix.

Every error answers in OpenAI's shape (`openai_schema.error_response`); invalid bodies get 400, as
OpenAI's API answers them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute

from .. import checkpoint
from ..config import TextFormat
from ..multi import MultiPrefixModel, NamedPrefix
from .metrics import Metrics
from .openai_choices import DONE, ChoiceText, Shape, sse_error
from .openai_schema import (ERRORS, UNSUPPORTED, ChatCompletion, ChatCompletionRequest, ChatMessage, Completion,
                            CompletionRequest, ModelCard, ModelList, _Decoding, error_response)
from .admission import submit
from .rows import Row
from .schema import ApiError, GenerateRequest
from .served_route import ServedRoute
from .requestlog import current

RAW = TextFormat(source="{input}")
"""The prompt as given: the base model's completions, and every chat prompt (already a rendered template)."""

_MAX_STOPS = 4


class OpenAIError(ApiError):
    """An ApiError that names the request field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None):
        super().__init__(status, kind, message)
        self.param = param


class OpenAIRoute(APIRoute):
    """Answers validation errors and ApiErrors of its endpoint in OpenAI's error shape."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def answer(request: Request):
            try:
                return await handler(request)
            except RequestValidationError as err:
                return _invalid(err)
            except ApiError as err:
                code = "model_not_found" if err.kind == "unknown_task" else err.kind
                return error_response(err.status, code, err.message, getattr(err, "param", None), err.headers)

        return answer


def _invalid(err: RequestValidationError):
    problems = err.errors()
    if any(p.get("type") == "json_invalid" for p in problems):
        return error_response(400, "invalid_json", "request body is not valid JSON")
    first = problems[0]
    param = ".".join(str(x) for x in first["loc"][1:]) or None
    message = "; ".join(f"{'.'.join(str(x) for x in p['loc'][1:]) or 'body'}: {p['msg']} (got {p.get('input')!r})"
                        for p in problems[:5])
    return error_response(400, "invalid_request", message, param)


def base_model_id(multi: MultiPrefixModel) -> str:
    """The `model` id of the base model without a prefix: the last part of its name or path."""
    return Path(getattr(multi.base.config, "name_or_path", "") or "base").name or "base"


class OpenAIApi:
    """The three OpenAI routes over the server's task cache and batcher."""

    def __init__(self, served: Callable[[str], ServedRoute], metrics: Metrics):
        self.completion_route, self.chat_route = served("/v1/completions"), served("/v1/chat/completions")
        self.multi, self.metrics, self.cache = self.chat_route.multi, metrics, self.chat_route.cache
        self.base_id, self.started = base_model_id(self.multi), int(time.time())

    def router(self) -> APIRouter:
        router = APIRouter(route_class=OpenAIRoute, tags=["OpenAI-compatible"])
        router.get("/v1/models", response_model=ModelList, summary="The base model and the loaded tasks")(self.models)
        router.post("/v1/completions", response_model=Completion, responses=ERRORS,
                    summary="OpenAI completions: model = task name")(self.completions)
        router.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS,
                    summary="OpenAI chat completions: messages through the chat template, then the task")(self.chat)
        return router

    async def models(self) -> ModelList:
        tasks = sorted(self.multi.tasks().items())
        cards = [ModelCard(id=self.base_id, created=self.started, root=self.base_id, parent=None, prefix_length=None,
                           num_parameters=None)] if self.base_id not in dict(tasks) else []
        cards += [ModelCard(id=name, created=self._saved(t), root=self.base_id, parent=self.base_id,
                            prefix_length=t.prefix.length, num_parameters=t.prefix.num_parameters()) for name, t in tasks]
        return ModelList(data=cards)

    async def completions(self, body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise OpenAIError(400, "invalid_request", "prompt is an empty list: give a text or a list of texts",
                              "prompt")
        return await self._serve(self.completion_route, body, prompts, chat=False, request=request)

    async def chat(self, body: ChatCompletionRequest, request: Request):
        if body.max_completion_tokens is not None:
            body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
        return await self._serve(self.chat_route, body, [self._render(body.messages)], chat=True, request=request)

    # --- one request ---------------------------------------------------------------------------------
    async def _serve(self, route: ServedRoute, body: _Decoding, prompts: list[str], chat: bool, request: Request):
        start = time.monotonic()
        _check_supported(body)
        stops = _stops(body.stop)
        if (record := current()) is not None:
            record.user = body.user
        task = await self._task(route, body.model, raw=chat)
        native = _generate_request(body, task.name, prompts, chat)
        config = route._config(native)
        if body.n > 1 and config.num_beams > 1:
            raise OpenAIError(400, "invalid_request", f"n={body.n} with num_beams={config.num_beams}: beam search "
                              "gives one result per prompt; use n=1", "n")
        count, limit = len(prompts) * body.n, self.completion_route.settings.max_inputs_per_request
        if count > limit:
            raise OpenAIError(400, "invalid_request", f"{len(prompts)} prompts x n={body.n} = {count} choices; this "
                              f"server gives at most {limit} per request", "n" if body.n > 1 else "prompt")
        # rows stream their tokens out of the engine when the client streams, or to stop at a stop sequence
        stream_rows = route.batcher.stepwise(config) and (body.stream or bool(stops))
        queue: asyncio.Queue = asyncio.Queue()
        row_body = native.model_copy(update={"stream": stream_rows})
        rows = [route._row(k, text, task, config, row_body, queue) for k, text in enumerate(native.input)]
        submit(route.batcher, rows, route.settings.retry_after_s)
        choices = [ChoiceText(stops, len(row.prompt)) for row in rows]
        events = route._events(rows, queue, start, None if body.stream else request)
        shape = Shape(chat, body.model)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(self._stream(route, shape, rows, choices, events, body.n, usage, start),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async with contextlib.aclosing(events):
            async for index, kind, data in events:
                if kind == "error":
                    raise ApiError(500, "generation_failed", data["message"])
                if self._see(route, rows, choices, index, kind, data)[1]:
                    break
        if not all(c.finish for c in choices):
            raise ApiError(499, "client_closed", "the client disconnected; the request's work was cancelled")
        self.metrics.request_latency.labels(route.route).observe(time.monotonic() - start)
        return shape.response(choices, body.n)

    async def _stream(self, route: ServedRoute, shape: Shape, rows: list[Row], choices: list[ChoiceText],
                      events: AsyncIterator, n: int, usage: bool, start: float) -> AsyncIterator[str]:
        for chunk in shape.opening(len(choices)):
            yield chunk
        try:
            async with contextlib.aclosing(events):
                async for index, kind, data in events:
                    if kind == "error":
                        yield sse_error(500, "generation_failed", data["message"])
                        return
                    before = choices[index].finish
                    new, ended = self._see(route, rows, choices, index, kind, data)
                    if new or choices[index].finish != before:
                        yield shape.delta(index, new, choices[index].finish)
                    if ended:
                        break
        except ApiError as err:
            yield sse_error(err.status, err.kind, err.message)
            return
        if usage:
            yield shape.usage_chunk(choices, n)
        yield DONE
        self.metrics.request_latency.labels(route.route).observe(time.monotonic() - start)

    def _see(self, route: ServedRoute, rows: list[Row], choices: list[ChoiceText], index: int, kind: str,
             data: dict) -> tuple[str, bool]:
        """Feed one event to its choice: (the text it may stream now, whether every choice has finished)."""
        choice = choices[index]
        before = choice.finish
        new = choice.see(kind, data)
        if kind == "token" and choice.finish and not before:  # a stop sequence: the row's remaining work is moot
            route.batcher.cancel([rows[index]])
        return new, all(c.finish for c in choices)

    async def _task(self, route: ServedRoute, model: str, raw: bool) -> NamedPrefix:
        if model == self.base_id and model not in self.multi.tasks():
            if (record := current()) is not None:
                record.task = model
            return NamedPrefix(model, None, RAW)
        try:
            task = await route.resolve(model)
        except ApiError as err:
            raise OpenAIError(err.status, err.kind, err.message, "model") from None
        return dataclasses.replace(task, text_format=RAW) if raw else task

    def _render(self, messages: list[ChatMessage]) -> str:
        tokenizer = self.multi.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, "no_chat_template", f"the tokenizer of {self.base_id!r} has no chat template, so "
                              "messages cannot be rendered; send the text to /v1/completions instead", "messages")
        turns = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            with self.chat_route.batcher.tokenizer_lock:
                return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template's own checks (jinja raise_exception), e.g. role order
            raise OpenAIError(400, "invalid_messages", f"the chat template refused these messages: {err}",
                              "messages") from None

    def _saved(self, task: NamedPrefix) -> int:
        config = Path(task.source) / checkpoint.CONFIG_NAME if task.source else None
        return int(config.stat().st_mtime) if config is not None and config.is_file() else self.started


def _check_supported(body: _Decoding) -> None:
    for name, unused in UNSUPPORTED.items():
        if name in type(body).model_fields:
            value = getattr(body, name)
            if value not in (unused if isinstance(unused, tuple) else (unused,)):
                raise OpenAIError(400, "unsupported_parameter", f"{name}={value!r} is not supported by this server; "
                                  "leave it unset", name)


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > _MAX_STOPS or not all(stops):
        raise OpenAIError(400, "invalid_request", f"stop must be up to {_MAX_STOPS} non-empty strings, got {stop!r}",
                          "stop")
    return stops


def _generate_request(body: _Decoding, task: str, prompts: list[str], chat: bool) -> GenerateRequest:
    """The /v1/generate request that means the same: one input per choice, OpenAI's temperature rule applied."""
    if body.num_beams > 1 and body.temperature:
        raise OpenAIError(400, "invalid_request", f"temperature={body.temperature} samples, which beam search "
                          f"(num_beams={body.num_beams}) does not serve; set temperature 0 or leave it unset",
                          "temperature")
    temperature = body.temperature if body.temperature is not None else (0.0 if body.num_beams > 1 else 1.0)
    sample = temperature > 0
    inputs = [p for p in prompts for _ in range(body.n)]
    return GenerateRequest(task=task, input=inputs, max_new_tokens=body.max_tokens, min_new_tokens=body.min_tokens,
                           num_beams=body.num_beams, do_sample=sample, temperature=temperature if sample else 1.0,
                           top_p=body.top_p if sample else 1.0, length_penalty=body.length_penalty, seed=body.seed,
                           block_newlines=(not chat) if body.block_newlines is None else body.block_newlines,
                           stream=body.stream)
