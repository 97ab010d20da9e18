"""`prefixtune serve --ray --replicas N`: N copies of the server behind Ray Serve's HTTP proxy.

Every replica is the plain server (`app.build_app` of the same flags): it holds its own base model and all
its prefixes (they are small), reads the same --prefix-dir, and watches it (`storewatch`, every
--store-poll-s seconds, 2 s by default here), so a prefix added, replaced or deleted in the directory is
served, reloaded or dropped by every replica within about that long, without a restart. PUT and DELETE
/v1/tasks reach only the one replica the proxy picks: with replicas, change prefixes in the directory.

A dead replica (killed, out of memory) is restarted by Ray Serve's controller (health checks every 2 s);
until then the proxy routes around it. A request that was on the dead replica fails: the proxy would answer
a bare 500, which `_ProxyErrors` (a middleware in the proxy) turns into 503 `replica_unavailable` with
Retry-After, so a client knows to retry. A request that finds no live replica waits in the proxy's queue,
bounded by `max_queued_requests` (then 503) and by the proxy's request_timeout_s (then 408): no request
hangs. A stream (SSE) already started when its replica dies just ends early, without its `done` event. The answer carries the replica that made
it in the `X-Prefixtune-Replica` header, and /health names the replica and its process id.

Use from Python: `deployment(args)` is the bound application for `serve.run`; `cli_main_ray(args)` runs it.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..extras import MissingExtra, needs

with needs("ray"):
    import ray
    try:
        from ray import serve
    except ModuleNotFoundError as err:  # ray without its [serve] packages (grpc, aiohttp, ...): name them
        raise MissingExtra("ray", f"{err.name} (Ray Serve needs ray[serve])") from err

REPLICA_HEADER = "x-prefixtune-replica"
QUEUE_PER_REPLICA = 64
"""Requests the proxy queues per replica beyond those it is running, before answering 503."""
TIMEOUT_MARGIN_S = 30.0
"""The proxy's own request timeout is the server's request_timeout_s plus this: the server's 504 comes first."""


class _ProxyErrors:
    """ASGI middleware in Ray Serve's proxy: a failure no replica answered (the replica died with the request,
    or none was reachable) becomes 503 with Retry-After and the server's error shape, not a bare 500.

    The proxy ends such a request without sending anything (uvicorn then answers a bare 500), raises, or
    answers without REPLICA_HEADER; errors a replica made itself carry that header and pass unchanged."""

    def __init__(self, app, retry_after_s: int = 1):
        self.app, self.retry_after_s = app, retry_after_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "replaced": False}

        async def checked(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                if message["status"] >= 500 and REPLICA_HEADER.encode() not in names:
                    state["replaced"] = True
                    return await self._unavailable(send, state)
                state["started"] = True
            elif state["replaced"]:
                return  # the proxy's own text after a replaced start is dropped
            await send(message)

        try:
            await self.app(scope, receive, checked)
        except Exception:
            if state["started"]:  # a body already under way cannot change its status: the stream just ends
                raise
        if not state["started"]:  # the proxy sent nothing (how it ends a request whose replica died)
            await self._unavailable(send, state)

    async def _unavailable(self, send, state: dict) -> None:
        state["started"] = True
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"retry-after", str(self.retry_after_s).encode())]})
        await send({"type": "http.response.body", "body": _UNAVAILABLE % self.retry_after_s})


_UNAVAILABLE = (b'{"error":{"type":"replica_unavailable","message":"no replica finished this request (the one '
                b'serving it stopped and is being restarted, or none is reachable yet): retry after %d s"}}')


class _ReplicaHeader:
    """ASGI middleware: every response names the replica that made it (which replica answered is otherwise
    invisible behind the proxy)."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]}
            await send(message)

        await self.app(scope, receive, tagged)


@serve.ingress()
class PrefixtuneReplica:
    """One replica: the whole server of `args` (parsed `prefixtune serve` flags)."""

    def __init__(self, args: argparse.Namespace):
        from .app import build_app

        self.server = build_app(args)
        replica = serve.get_replica_context().replica_id.unique_id
        self.server.state.health_extra.update(replica=replica, pid=os.getpid())
        self.asgi = _ReplicaHeader(self.server, replica)

    def __serve_build_asgi_app__(self):
        return self.asgi

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose batching worker died is replaced, like a dead one."""
        if not self.server.state.batcher.alive:
            raise RuntimeError("the batching worker stopped")


def deployment(args: argparse.Namespace, health_check_period_s: float = 2.0):
    """The Ray Serve application of `args` (with --replicas and --replica-cpus), for `serve.run`."""
    settings_timeout = getattr(args, "request_timeout_s", 120.0)
    return serve.deployment(
        PrefixtuneReplica, name="prefixtune", num_replicas=args.replicas,
        ray_actor_options={"num_cpus": args.replica_cpus},
        # the server batches many requests itself: let the proxy hand over a batch's worth at once
        max_ongoing_requests=max(args.max_batch_size * 2, 8),
        max_queued_requests=QUEUE_PER_REPLICA * args.replicas,
        health_check_period_s=health_check_period_s, health_check_timeout_s=max(10.0, health_check_period_s),
        graceful_shutdown_timeout_s=min(settings_timeout, 30.0),
    ).bind(args)


def http_options(args: argparse.Namespace) -> dict:
    """Ray Serve's HTTP proxy options for `serve.start`: --host/--port and a timeout behind the server's own."""
    return {"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s + TIMEOUT_MARGIN_S}


PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = f"{__name__}.proxy_middlewares"


def proxy_middlewares() -> list:
    """The proxy's middlewares (Ray Serve calls this in the proxy process, found through PROXY_CALLBACK_ENV:
    HTTPOptions no longer takes middlewares)."""
    from starlette.middleware import Middleware

    return [Middleware(_ProxyErrors, retry_after_s=1)]


def init_ray(address: str | None = None, **ray_init_kwargs) -> None:
    """`ray.init` with the proxy's 503 middleware: the environment variable reaches the proxy of a Ray instance
    started here (its processes inherit this environment). On a cluster started with `ray start`, set
    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=prefixtune.serve.ray_serve.proxy_middlewares there instead."""
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    ray.init(address=address, include_dashboard=False, **ray_init_kwargs)


def cli_main_ray(args: argparse.Namespace) -> int:
    """`prefixtune serve --ray`: start (or join, with $RAY_ADDRESS) Ray, deploy, serve until interrupted."""
    from .settings import settings_from_args, warn_if_exposed

    try:
        settings = settings_from_args(args)  # bad flags fail here, not N times in replicas
    except ValueError as err:
        print(f"prefixtune serve: {err}", file=sys.stderr)
        return 2
    warn_if_exposed(args.host, settings)
    init_ray(os.environ.get("RAY_ADDRESS"))
    try:
        serve.start(http_options=http_options(args))
        serve.run(deployment(args), name="prefixtune", route_prefix="/")
        print(f"prefixtune serve: {args.replicas} Ray Serve replicas on http://{args.host}:{args.port} "
              f"(prefix store polled every {settings.store_poll_s:g} s)", file=sys.stderr)
        _wait_forever()
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.shutdown()
        except Exception as err:  # Ctrl-C reached Ray's own processes too: the controller may be gone already
            print(f"prefixtune serve: Ray Serve shutdown: {type(err).__name__}: {err}", file=sys.stderr)
        ray.shutdown()
    return 0


def _wait_forever() -> None:
    import threading

    threading.Event().wait()
