"""`routes.GenerateRoute` as the server runs it: tasks come from the task cache (loaded on demand) and
every row's events are counted and timed. The OpenAI routes decode through instances of the same class,
so all three routes share one path from request to rows to events.
"""

from __future__ import annotations

import contextlib
import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from ..multi import MultiPrefixModel, NamedPrefix
from . import requestlog
from .metrics import Metrics
from .routes import GenerateRoute
from .rows import Row
from .scheduler import Batcher
from .schema import ApiError, GenerateRequest
from .settings import ServeSettings
from .taskcache import TaskCache


class ServedRoute(GenerateRoute):
    """GenerateRoute with the task cache and per-route metrics; `route` labels what it records."""

    def __init__(self, multi: MultiPrefixModel, settings: ServeSettings, batcher: Batcher, metrics: Metrics,
                 cache: TaskCache, route: str):
        super().__init__(multi, settings, batcher, metrics)
        self.cache, self.route = cache, route

    async def handle(self, body: GenerateRequest, request: Request):
        await self.resolve(body.task)
        return await super().handle(body, request)

    async def resolve(self, name: str) -> NamedPrefix:
        """The task, loaded off the event loop if it is on disk but not resident; recorded as the request's task."""
        task = self.cache.resident(name)
        if task is not None:
            self.cache.get(name)  # counts the hit and marks it recently used
        else:
            task = await run_in_threadpool(self.cache.get, name)
        if (record := requestlog.current()) is not None:
            record.task = name
        return task

    def _task(self, name: str) -> NamedPrefix:
        # resolve() made it resident; a concurrent request may have evicted it since, then it loads again
        return self.cache.resident(name) or self.cache.get(name)

    async def _events(self, rows: list[Row], queue, start: float,
                      request: Request | None) -> AsyncIterator[tuple[int, str, dict]]:
        clock = _RowClock(self.metrics, self.route, rows, start)
        try:
            async with contextlib.aclosing(super()._events(rows, queue, start, request)) as events:
                async for index, kind, data in events:
                    clock.see(index, kind, data)
                    yield index, kind, data
        except ApiError as err:  # a timeout: answered 504, or sent as the stream's last event
            clock.failed(err.kind)
            raise


class _RowClock:
    """Counts a request's tokens and times its rows from their events."""

    def __init__(self, metrics: Metrics, route: str, rows: list[Row], start: float):
        self.metrics, self.route, self.rows, self.start = metrics, route, rows, start
        self.record = requestlog.current()
        self.first: dict[int, float] = {}
        self.streamed: dict[int, int] = {}
        for row in rows:
            self.metrics.input_tokens.labels(route, row.task).inc(len(row.prompt))
        self._add_to_record("input_tokens", sum(len(r.prompt) for r in rows))

    def see(self, index: int, kind: str, data: dict) -> None:
        now, row = time.monotonic(), self.rows[index]
        if index not in self.first:
            self.first[index] = now
            self.metrics.queue_time.labels(self.route).observe(max(0.0, row.admitted - row.arrived))
            if kind == "token":
                self.metrics.time_to_first_token.labels(self.route).observe(now - self.start)
        if kind == "token":
            self.streamed[index] = self.streamed.get(index, 0) + 1
            self._tokens(row, 1)
        elif kind == "done":
            streamed = self.streamed.get(index, 0)
            if streamed == 0:  # not streamed: its tokens arrive all at once
                self._tokens(row, data["output_tokens"])
            elif streamed > 1:
                per_token = (now - self.first[index]) / (streamed - 1)
                self.metrics.time_per_output_token.labels(self.route).observe(per_token)
        elif kind == "error":
            self.failed("generation_failed")

    def failed(self, kind: str) -> None:
        if self.record is not None and not self.record.error:
            self.record.error = kind

    def _tokens(self, row: Row, n: int) -> None:
        self.metrics.output_tokens.labels(self.route, row.task).inc(n)
        self._add_to_record("output_tokens", n)

    def _add_to_record(self, name: str, n: int) -> None:
        if self.record is not None:
            setattr(self.record, name, getattr(self.record, name) + n)
