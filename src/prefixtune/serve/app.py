"""`prefixtune serve`: one frozen base model, many prefixes (tasks), one HTTP server (FastAPI + uvicorn).

Routes (documented on /docs): POST /v1/generate, GET /v1/tasks, PUT and DELETE /v1/tasks/{name},
GET /health, GET /metrics. Rows of different tasks are decoded in the same batches by
`scheduler.Batcher`; `routes` answers /v1/generate; this module is the rest of the HTTP side: the
app, errors, auth and the CLI glue.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import logging
import sys
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..models import load_base_model
from ..multi import MultiPrefixModel, Task
from .metrics import Metrics
from .routes import GenerateRoute
from .scheduler import Batcher
from .schema import ERRORS, ApiError, GenerateResponse, TaskInfo, TaskList, _error
from .settings import TASK_NAME, ServeSettings, settings_from_args
from .store import load_prefix_dir, load_task

logger = logging.getLogger("prefixtune.serve")


def _info(task: Task) -> TaskInfo:
    return TaskInfo(name=task.name, prefix_length=task.prefix.length, num_parameters=task.prefix.num_parameters(),
                    source=task.source)


# --- the app ---------------------------------------------------------------------------------------
class _Gate:
    """ASGI middleware run before any body is read: API key, body size, and generate requests by status.

    Checking here (not in a route dependency) answers 401/413 before the body is parsed.
    """

    def __init__(self, app, settings: ServeSettings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = scope["path"] == "/v1/generate"
        refusal = self._refusal(scope)
        if refusal is not None:
            if counted:
                self.metrics.request(refusal.status_code)
            return await refusal(scope, receive, send)

        async def counting_send(message):
            if counted and message["type"] == "http.response.start":
                self.metrics.request(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.lower(): v for k, v in scope["headers"]}
        key = self.settings.api_key
        if key is not None and (scope["path"].startswith("/v1/") or scope["path"] == "/metrics"):
            given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
            if not hmac.compare_digest(given, key.encode()):
                return _error(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer KEY' or "
                              "'X-API-Key: KEY'", {"WWW-Authenticate": "Bearer"})
        length, limit = headers.get(b"content-length"), self.settings.max_body_bytes
        if length is None and b"transfer-encoding" in headers:
            return _error(411, "length_required", "send the body with a Content-Length header")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return _error(413, "body_too_large", f"request body of {length.decode(errors='replace')} bytes; "
                          f"the limit is {limit}")
        return None


def create_app(multi: MultiPrefixModel, settings: ServeSettings) -> FastAPI:
    """The server for `multi` (its tokenizer is required); also loads every prefix in settings.prefix_dir.

    The batching worker starts with the app's lifespan (uvicorn runs it) and stops with it.
    """
    settings.validate()
    if multi.tokenizer is None:
        raise ValueError("serving needs MultiPrefixModel(base, tokenizer)")
    if settings.prefix_dir is not None:
        load_prefix_dir(multi, Path(settings.prefix_dir))
    metrics = Metrics()
    batcher = Batcher(multi, metrics, max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000,
                      max_queue=settings.max_queue, mix_tasks=settings.mix_tasks)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="prefixtune", lifespan=lifespan, responses={401: ERRORS[401]},
                  description="Many prefix-tuned tasks served from one frozen model, mixed in every batch.")
    app.state.batcher, app.state.metrics, app.state.settings = batcher, metrics, settings
    app.add_middleware(_Gate, settings=settings, metrics=metrics)
    _add_error_handlers(app)
    generate = GenerateRoute(multi, settings, batcher, metrics)
    app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS,
             summary="Generate for one task (one input or a list); stream=true for server-sent events")(generate.handle)

    _task_routes(app, multi, settings)
    _ops_routes(app, multi, batcher, metrics)
    return app


def _task_routes(app: FastAPI, multi: MultiPrefixModel, settings: ServeSettings) -> None:
    @app.get("/v1/tasks", response_model=TaskList, summary="Loaded tasks")
    async def list_tasks() -> TaskList:
        return TaskList(tasks=[_info(t) for _, t in sorted(multi.tasks().items())])

    @app.put("/v1/tasks/{name}", response_model=TaskInfo, responses=ERRORS,
             summary="Load or reload a task from the prefix directory (201 when new)")
    async def put_task(name: str) -> JSONResponse:
        if settings.prefix_dir is None:
            raise ApiError(400, "no_prefix_dir", "this server was started without a prefix directory")
        new = name not in multi.tasks()
        task = await run_in_threadpool(load_task, multi, Path(settings.prefix_dir), name)
        return JSONResponse(_info(task).model_dump(), status_code=201 if new else 200)

    @app.delete("/v1/tasks/{name}", responses=ERRORS, summary="Unload a task (files stay)")
    async def delete_task(name: str) -> dict:
        try:
            multi.remove(name)
        except KeyError as err:
            raise ApiError(404, "unknown_task", err.args[0]) from None
        return {"deleted": name}


def _ops_routes(app: FastAPI, multi: MultiPrefixModel, batcher: Batcher, metrics: Metrics) -> None:
    @app.get("/health", summary="Liveness and load (for load balancers)")
    async def health() -> JSONResponse:
        body = {"status": "ok" if batcher.alive else "worker_stopped", "tasks": len(multi.tasks()),
                "queue_depth": batcher.queue_depth, "active_rows": batcher.active_rows}
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics_text() -> PlainTextResponse:
        gauges = {"prefixtune_queue_depth": ("Rows waiting for a batch slot.", batcher.queue_depth),
                  "prefixtune_active_rows": ("Rows being decoded step by step.", batcher.active_rows),
                  "prefixtune_tasks": ("Loaded tasks.", len(multi.tasks()))}
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.kind, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            detail = problems[0].get("ctx", {}).get("error", "")
            return _error(400, "invalid_json", f"request body is not valid JSON: {detail}".rstrip(": "))
        parts = [f"{'.'.join(str(x) for x in p['loc'][1:]) or 'body'}: {p['msg']} (got {p.get('input')!r})"
                 for p in problems[:5]]
        return _error(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return _error(err.status_code, kind, str(err.detail))


def cli_main(args: argparse.Namespace) -> int:
    """`prefixtune serve`: load the model and prefixes, then serve until interrupted. Returns the exit code."""
    import torch
    import uvicorn

    try:
        settings = settings_from_args(args)
        explicit = [spec.split("=", 1) for spec in args.prefix]
        bad = [s for s, pair in zip(args.prefix, explicit) if len(pair) != 2 or not TASK_NAME.fullmatch(pair[0])]
        if bad:
            raise ValueError(f"--prefix wants NAME=PATH with a valid task name, got {bad[0]!r}")
        if not Path(args.prefix_dir).is_dir():
            raise ValueError(f"--prefix-dir {args.prefix_dir} is not a directory")
    except ValueError as err:
        print(f"prefixtune serve: {err}", file=sys.stderr)
        return 2
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model, tokenizer = load_base_model(args.model)
    multi = MultiPrefixModel(model, tokenizer)
    for name, path in explicit:
        multi.add(name, path)
    app = create_app(multi, settings)
    if args.host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(f"prefixtune serve: WARNING: listening on {args.host} without an API key", file=sys.stderr)
    print(f"prefixtune serve: {len(multi.tasks())} tasks on http://{args.host}:{args.port} (docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
