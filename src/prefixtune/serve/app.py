"""`prefixtune serve`: one frozen base model, many prefixes (tasks), one HTTP server (FastAPI + uvicorn).

Routes (documented on /docs): POST /v1/generate, GET /v1/tasks, PUT and DELETE /v1/tasks/{name},
GET /v1/models, POST /v1/completions and /v1/chat/completions (OpenAI-compatible), GET /health,
GET /metrics. Rows of different tasks are decoded in the same batches by `scheduler.Batcher`; `routes`
answers /v1/generate, `openai_routes` the OpenAI routes, `taskcache` keeps the resident tasks; this
module is the rest of the HTTP side: the app, errors, auth and the CLI glue.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import sys
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..cli import model_config
from .. import precision
from ..decoding.api import decode_workload
from ..extras import needs
from ..base_model import load
from ..multi import MultiPrefixModel, NamedPrefix
from ..peft_import import is_peft_checkpoint
from .metrics import CONTENT_TYPE, Metrics
from .openai_routes import OpenAIApi
from .requestlog import RequestLog
from .requestlog import logger as request_logger
from .scheduler import Batcher
from .schema import ERRORS, ApiError, GenerateResponse, TaskInfo, TaskList, _error
from .served_route import ServedRoute
from .settings import TASK_NAME, ServeSettings, settings_from_args, warn_if_exposed
from .store import public_source
from .storewatch import StoreWatch
from .taskcache import TaskCache

logger = logging.getLogger("prefixtune.serve")


def _info(task: NamedPrefix, root: Path | None) -> TaskInfo:
    return TaskInfo(name=task.name, prefix_length=task.prefix.length, num_parameters=task.prefix.num_parameters(),
                    source=public_source(task, root))


# --- the app ---------------------------------------------------------------------------------------
class _Gate:
    """ASGI middleware run before any body is read: API key, body size, and a body that never arrives in full.

    Checking here (not in a route dependency) answers 401/413 before the body is parsed. Its refusals are
    counted by `requestlog.RequestLog`, the outer middleware.
    """

    def __init__(self, app, settings: ServeSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if dict(scope["headers"]).get(b"content-length", b"0") != b"0":
            receive = await self._whole_body(scope, receive, send)
            if receive is None:
                return
        await self.app(scope, receive, send)

    async def _whole_body(self, scope, receive, send):
        """Read the body within body_timeout_s, then replay it; None when answered 408 or the client left.

        Without this, a body shorter than its Content-Length holds the connection (and a handler) forever."""
        loop, chunks, more = asyncio.get_running_loop(), [], True
        deadline = loop.time() + self.settings.body_timeout_s
        while more:
            try:  # asyncio.wait_for, not asyncio.timeout: Python 3.10
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                expected = dict(scope["headers"])[b"content-length"].decode()
                answer = _error(408, "body_timeout", f"request body incomplete: {sum(map(len, chunks))} of its "
                                f"{expected} bytes (Content-Length) arrived within {self.settings.body_timeout_s:g} s")
                await answer(scope, receive, send)
                return None
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        return lambda: _next(replay, receive)

    def _refusal(self, scope) -> JSONResponse | None:
        headers = {k.lower(): v for k, v in scope["headers"]}
        key = self.settings.api_key
        if key is not None and (scope["path"].startswith("/v1/") or scope["path"] == "/metrics"):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            given = headers.get(b"x-api-key") or (token.strip() if scheme.lower() == b"bearer" else b"")
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


async def _next(replay: list[dict], receive) -> dict:
    """The body read ahead, once; then the client's own messages (a disconnect)."""
    return replay.pop() if replay else await receive()


def _bf16(multi: MultiPrefixModel, settings: ServeSettings) -> bool:
    """Whether this server runs under bf16 autocast ("auto": timed on a decoding step at max_batch_size rows).
    The model's weights are left as they are (the caller may use it outside the server too)."""
    base = multi.base
    return precision.bf16_wanted(settings.bf16, next(base.parameters()).device,
                                 decode_workload(base, settings.max_batch_size))


def create_app(multi: MultiPrefixModel, settings: ServeSettings) -> FastAPI:
    """The server for `multi` (its tokenizer is required). Loads every prefix in settings.prefix_dir, or with
    `max_tasks` only the pinned ones (the others load on demand).

    The batching worker starts with the app's lifespan (uvicorn runs it) and stops with it.
    """
    settings.validate()
    if multi.tokenizer is None:
        raise ValueError("serving needs MultiPrefixModel(base, tokenizer)")
    metrics = Metrics()
    root = None if settings.prefix_dir is None else Path(settings.prefix_dir)
    cache = TaskCache(multi, metrics, root, settings.max_tasks, settings.pin, settings.peft_text_format())
    cache.start()
    watch = StoreWatch(cache, settings.store_poll_s) if settings.store_poll_s else None
    batcher = Batcher(multi, metrics, max_batch_size=settings.max_batch_size, max_wait_s=settings.max_wait_ms / 1000,
                      max_queue=settings.max_queue, mix_tasks=settings.mix_tasks, bf16=_bf16(multi, settings))
    metrics.bind(batcher, multi)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        if watch is not None:
            watch.start()
        yield
        if watch is not None:
            await run_in_threadpool(watch.stop)
        await run_in_threadpool(batcher.stop)

    app = FastAPI(title="prefixtune", lifespan=lifespan, responses={401: ERRORS[401]},
                  description="Many prefix-tuned tasks served from one frozen model, mixed in every batch.")
    app.state.batcher, app.state.metrics, app.state.settings, app.state.tasks = batcher, metrics, settings, cache
    app.state.watch, app.state.health_extra = watch, {}  # health_extra: fields a host adds to /health (ray_serve)
    app.add_middleware(_Gate, settings=settings)
    app.add_middleware(RequestLog, metrics=metrics, log_json=settings.log_format == "json")  # outermost
    _add_error_handlers(app)
    served = lambda route: ServedRoute(multi, settings, batcher, metrics, cache, route)  # noqa: E731
    app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS,
             summary="Generate for one task (one input or a list); stream=true for server-sent events")(
        served("/v1/generate").handle)
    app.include_router(OpenAIApi(served, metrics).router())

    _task_routes(app, cache)
    _ops_routes(app, multi, batcher, metrics)
    return app


def _task_routes(app: FastAPI, cache: TaskCache) -> None:
    @app.get("/v1/tasks", response_model=TaskList, summary="Loaded (resident) tasks")
    async def list_tasks() -> TaskList:
        return TaskList(tasks=[_info(t, cache.root) for _, t in sorted(cache.multi.tasks().items())])

    @app.put("/v1/tasks/{name}", response_model=TaskInfo, responses=ERRORS,
             summary="Load or reload a task from the prefix directory (201 when new)")
    async def put_task(name: str) -> JSONResponse:
        new = cache.resident(name) is None
        task = await run_in_threadpool(cache.load, name)
        return JSONResponse(_info(task, cache.root).model_dump(), status_code=201 if new else 200)

    @app.delete("/v1/tasks/{name}", responses=ERRORS, summary="Unload a task (files stay; it loads again on demand)")
    async def delete_task(name: str) -> dict:
        cache.remove(name)
        return {"deleted": name}


def _ops_routes(app: FastAPI, multi: MultiPrefixModel, batcher: Batcher, metrics: Metrics) -> None:
    @app.get("/health", summary="Liveness and load (for load balancers)")
    async def health() -> JSONResponse:
        body = {"status": "ok" if batcher.alive else "worker_stopped", "tasks": len(multi.tasks()),
                "queue_depth": batcher.queue_depth, "active_rows": batcher.active_rows, **app.state.health_extra}
        return JSONResponse(body, status_code=200 if batcher.alive else 503)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)


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


def build_app(args: argparse.Namespace) -> FastAPI:
    """The app of parsed `prefixtune serve` flags: settings, base model, --prefix tasks and the prefix directory
    (what every Ray Serve replica runs too). Raises ValueError for a bad flag, before loading where it can."""
    import torch

    settings = settings_from_args(args)
    model_cfg = model_config(args).validate()  # a bad --device or --dtype before minutes of loading
    explicit = [spec.split("=", 1) for spec in args.prefix]
    bad = [s for s, pair in zip(args.prefix, explicit) if len(pair) != 2 or not TASK_NAME.fullmatch(pair[0])]
    if bad:
        raise ValueError(f"--prefix wants NAME=PATH with a valid task name, got {bad[0]!r}")
    if not Path(args.prefix_dir).is_dir():
        raise ValueError(f"--prefix-dir {args.prefix_dir} is not a directory")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    model, tokenizer = load(model_cfg)
    multi = MultiPrefixModel(model, tokenizer)
    for name, path in explicit:  # a PEFT checkpoint here takes --peft-source-format, as in --prefix-dir
        multi.add(name, path, settings.peft_text_format() if is_peft_checkpoint(path) else None)
    return create_app(multi, settings)  # ValueError: a pin that cannot load, --max-tasks too small for the pins


def cli_main(args: argparse.Namespace) -> int:
    """`prefixtune serve`: load the model and prefixes, then serve until interrupted. Returns the exit code."""
    with needs("serve"):
        import uvicorn

    if getattr(args, "ray", False):
        from .ray_serve import cli_main_ray  # imports ray (the [ray] extra) only on this path

        return cli_main_ray(args)
    try:
        app = build_app(args)
    except ValueError as err:
        print(f"prefixtune serve: {err}", file=sys.stderr)
        return 2
    settings = app.state.settings
    _json_log_lines(settings)
    warn_if_exposed(args.host, settings)
    print(f"prefixtune serve: {len(app.state.tasks.multi.tasks())} tasks on http://{args.host}:{args.port} "
          f"({precision_of(app)}; docs: /docs)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=settings.log_format != "json")  # the JSON lines replace the access log
    return 0


def precision_of(app: FastAPI) -> str:
    base = app.state.tasks.multi.base
    return "bf16 autocast" if app.state.batcher.bf16 else str(next(base.parameters()).dtype).removeprefix("torch.")


def _json_log_lines(settings: ServeSettings) -> None:
    if settings.log_format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        request_logger.addHandler(handler)
        request_logger.setLevel(logging.INFO)
        request_logger.propagate = False
