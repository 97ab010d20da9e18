"""`prefixtune serve --ray --replicas N`: N copies of the server behind Ray Serve's HTTP proxy.

Every replica is the plain server (`app.build_app` of the same flags): it holds its own base model and all
its prefixes (they are small), reads the same --prefix-dir, and watches it (`storewatch`, every
--store-poll-s seconds, 2 s by default here), so a prefix added, replaced or deleted in the directory is
served, reloaded or dropped by every replica within about that long, without a restart. PUT and DELETE
/v1/tasks reach only the one replica the proxy picks: with replicas, change prefixes in the directory.

A dead replica (killed, out of memory) is restarted by Ray Serve's controller (health checks every 2 s);
until then the proxy routes around it. A request that was on the dead replica fails: the proxy would answer
a bare 500, which `_ProxyErrors` (a middleware in the proxy) turns into 503 `replica_unavailable` with
Retry-After, so a client knows to retry. A request that finds no free replica waits in the proxy's queue,
bounded by --ray-queue per replica (`max_queued_requests`; then 503 `queue_full`) and by the proxy's
--ray-timeout-s (`request_timeout_s`; then 408 `timeout`): no request hangs. A stream (SSE) already started
when its replica dies just ends early, without its `done` event. The answer carries the replica that made it
in the `X-Prefixtune-Replica` header, and /health names the replica and its process id.

With --ray-address (or $RAY_ADDRESS) the server joins that Ray cluster instead of starting one; its proxy has
the middleware only if the cluster was started with PROXY_CALLBACK_ENV set (the start warns otherwise).

Use from Python: `deployment(args)` is the bound application for `serve.run`; `cli_main_ray(args)` runs it.
"""

from __future__ import annotations

import argparse
import json
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
PROXY_HEADER = "x-prefixtune-proxy"
"""Set by `_ProxyErrors` on every answer: its presence shows the proxy runs the middleware."""
_PROXY_MARK = (PROXY_HEADER.encode(), b"1")
QUEUE_PER_REPLICA = 64
"""Requests the proxy queues per replica beyond those it is running, before answering 503."""
TIMEOUT_MARGIN_S = 30.0
"""The proxy's own request timeout is the server's request_timeout_s plus this: the server's 504 comes first."""


class _ProxyErrors:
    """ASGI middleware in Ray Serve's proxy: an answer the proxy made itself, not a replica, gets the server's
    error shape: a failure no replica answered (the replica died with the request, or none was reachable)
    becomes 503 `replica_unavailable` with Retry-After instead of a bare 500; the proxy's full queue (its
    backpressure 503) becomes 503 `queue_full`; its request timeout (408) becomes 408 `timeout`.

    The proxy ends a failed request without sending anything (uvicorn then answers a bare 500), raises, or
    answers without REPLICA_HEADER; errors a replica made itself carry that header and pass unchanged. Every
    answer gets PROXY_HEADER, by which `cli_main_ray` sees that the proxy runs this middleware."""

    def __init__(self, app, retry_after_s: int = 1):
        self.app, self.retry_after_s = app, retry_after_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "held": None}  # held: [status, body so far] of a proxy-made error

        async def checked(message):
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                if REPLICA_HEADER.encode() not in names and (message["status"] >= 500 or message["status"] == 408):
                    state["held"] = [message["status"], b""]  # its text decides the type (backpressure or not)
                    return
                state["started"] = True
                message = {**message, "headers": [*message.get("headers", []), _PROXY_MARK]}
            elif state["held"] is not None:
                if not state["started"]:
                    state["held"][1] += message.get("body", b"")
                    if not message.get("more_body", False):
                        await self._replace(send, state)
                return
            await send(message)

        try:
            await self.app(scope, receive, checked)
        except Exception:
            if state["started"]:  # a body already under way cannot change its status: the stream just ends
                raise
        if not state["started"]:  # the proxy sent nothing (how it ends a request whose replica died)
            await self._replace(send, state)

    async def _replace(self, send, state: dict) -> None:
        status, text = state["held"] or (500, b"")
        state["started"] = True
        if status == 408:
            kind, message = "timeout", ("the request did not finish within the proxy's request timeout "
                                        "(--ray-timeout-s); its work was cancelled")
        elif status == 503 and b"backpressure" in text:
            status, kind, message = 503, "queue_full", (f"the proxy's queue is full (--ray-queue requests per "
                                                        f"replica): retry after {self.retry_after_s} s")
        else:
            status, kind, message = 503, "replica_unavailable", (
                "no replica finished this request (the one serving it stopped and is being restarted, or none "
                f"is reachable yet): retry after {self.retry_after_s} s")
        headers = [(b"content-type", b"application/json"), _PROXY_MARK]
        if status == 503:
            headers.append((b"retry-after", str(self.retry_after_s).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body",
                    "body": json.dumps({"error": {"type": kind, "message": message}}).encode()})


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
        max_queued_requests=_queue_per_replica(args) * args.replicas,  # the proxy's queue, then 503 queue_full
        health_check_period_s=health_check_period_s, health_check_timeout_s=max(10.0, health_check_period_s),
        graceful_shutdown_timeout_s=min(settings_timeout, 30.0),
    ).bind(args)


def _queue_per_replica(args: argparse.Namespace) -> int:
    queue = getattr(args, "ray_queue", None)
    return QUEUE_PER_REPLICA if queue is None else queue


def http_options(args: argparse.Namespace) -> dict:
    """Ray Serve's HTTP proxy options for `serve.start`: --host/--port and the proxy's request timeout (then 408):
    --ray-timeout-s, by default behind the server's own (--request-timeout-s + TIMEOUT_MARGIN_S)."""
    timeout = getattr(args, "ray_timeout_s", None)
    if timeout is None:
        timeout = args.request_timeout_s + TIMEOUT_MARGIN_S
    return {"host": args.host, "port": args.port, "request_timeout_s": timeout}


PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = f"{__name__}.proxy_middlewares"


def proxy_middlewares() -> list:
    """The proxy's middlewares (Ray Serve calls this in the proxy process, found through PROXY_CALLBACK_ENV:
    HTTPOptions no longer takes middlewares)."""
    from starlette.middleware import Middleware

    return [Middleware(_ProxyErrors, retry_after_s=1)]


def init_ray(address: str | None = None, **ray_init_kwargs) -> None:
    """`ray.init` with the proxy's 503 middleware: the environment variable reaches the proxy of a Ray instance
    started here (its processes inherit this environment). A cluster joined at `address` has its own processes:
    start it with RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=prefixtune.serve.ray_serve.proxy_middlewares."""
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    ray.init(address=address, include_dashboard=False, **ray_init_kwargs)


def missing_middleware(url: str, timeout_s: float = 30.0) -> str | None:
    """None when the proxy at `url` answers /health with PROXY_HEADER (it runs `_ProxyErrors`), else what to do.

    A joined cluster's proxy gets the middleware only from the environment of its `ray start`: without it
    serving works, but a request whose replica died gets a bare 500 and a full queue Ray's plain-text 503.
    That is said as a warning, not refused: the answers are still right, only their failures are less clear."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout_s) as response:
            headers = response.headers
    except urllib.error.HTTPError as err:  # a 503 (a replica still starting) still shows the proxy's headers
        headers = err.headers
    except OSError as err:
        return f"cannot reach the proxy at {url} to check it ({err})"
    if headers.get(PROXY_HEADER) is not None:
        return None
    return (f"the Ray Serve proxy at {url} runs without prefixtune's error middleware: a request whose replica "
            f"died gets a bare 500 instead of 503 replica_unavailable. Start the cluster's nodes with "
            f"{PROXY_CALLBACK_ENV}={PROXY_CALLBACK} in the environment of `ray start`")


def cli_main_ray(args: argparse.Namespace) -> int:
    """`prefixtune serve --ray`: start Ray (or join the cluster at --ray-address / $RAY_ADDRESS), deploy, serve
    until interrupted."""
    from .settings import settings_from_args, warn_if_exposed

    try:
        settings = settings_from_args(args)  # bad flags fail here, not N times in replicas
    except ValueError as err:
        print(f"prefixtune serve: {err}", file=sys.stderr)
        return 2
    warn_if_exposed(args.host, settings)
    address = getattr(args, "ray_address", None) or os.environ.get("RAY_ADDRESS") or None
    init_ray(address)
    try:
        serve.start(http_options=http_options(args))
        serve.run(deployment(args), name="prefixtune", route_prefix="/")
        problem = missing_middleware(f"http://{_probe_host(args.host)}:{args.port}")
        if problem:
            print(f"prefixtune serve: WARNING: {problem}", file=sys.stderr)
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        print(f"prefixtune serve: {args.replicas} Ray Serve replicas on {where}, http://{args.host}:{args.port} "
              f"(prefix store polled every {settings.store_poll_s:g} s)", file=sys.stderr)
        _wait_forever()
    except KeyboardInterrupt:
        pass
    finally:
        _stop(address)
    return 0


def _probe_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)


def _stop(address: str | None) -> None:
    """A local Ray instance is ours: shut Serve and Ray down. On a joined cluster only our application goes;
    Serve and other applications there keep running."""
    try:
        if address:
            serve.delete("prefixtune")
        else:
            serve.shutdown()
    except Exception as err:  # Ctrl-C reached Ray's own processes too: the controller may be gone already
        print(f"prefixtune serve: Ray Serve shutdown: {type(err).__name__}: {err}", file=sys.stderr)
    ray.shutdown()


def _wait_forever() -> None:
    import threading

    threading.Event().wait()
