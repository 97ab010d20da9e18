"""`prefixtune serve --ray`: two CPU replicas of the tiny server behind Ray Serve's HTTP proxy, on a local
Ray instance (2 CPUs, no dashboard) and 127.0.0.1 only.

Answers through the proxy equal `MultiPrefixModel.generate` single runs; a prefix added, replaced or deleted
in the shared prefix directory reaches both replicas (the replica that answered is in a response header);
a replica killed with SIGKILL is restarted by Ray while every request gets 200 or 503, never a hang (every
request has a client timeout, every loop a deadline and a count).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from conftest import save_tiny  # noqa: E402
from prefixtune import MultiPrefixModel  # noqa: E402
from prefixtune.cli import model_config  # noqa: E402
from prefixtune.base_model import load  # noqa: E402
from prefixtune.serve import add_cli_arguments  # noqa: E402
from prefixtune.serve.settings import settings_from_args  # noqa: E402
from prefixtune.serve.ray_serve import (PROXY_CALLBACK, PROXY_CALLBACK_ENV, PROXY_HEADER, REPLICA_HEADER,  # noqa: E402
                                        _ProxyErrors, deployment, http_options, init_ray, missing_middleware)
from test_app import alone, save_prefix  # noqa: E402
from test_storewatch import replace  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIENT_TIMEOUT = 30.0
"""Every request's limit: a hang fails the test instead of holding it."""
STORE_BOUND_S = 30.0
"""How long a store change may take to reach both replicas (poll 0.5 s + load, on a busy 2-core machine)."""
RESTART_BOUND_S = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefixes")
    save_prefix(root / "alpha", 3, 0)
    save_prefix(root / "beta", 6, 1)
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--model", save_tiny(tmp_path_factory.mktemp("model") / "tiny"), "--prefix-dir", str(root),
                              "--ray", "--replicas", "2", "--port", str(free_port()), "--store-poll-s", "0.5",
                              "--torch-threads", "1", "--max-batch-size", "4", "--default-new-tokens", "8"])
    init_ray(num_cpus=2, log_to_driver=False)
    try:
        serve.start(http_options=http_options(args))
        serve.run(deployment(args, health_check_period_s=1.0), name="prefixtune", route_prefix="/")
        reference = MultiPrefixModel(*load(model_config(args)))
        for name in ("alpha", "beta"):
            reference.add(name, root / name)
        with httpx.Client(base_url=f"http://127.0.0.1:{args.port}", timeout=CLIENT_TIMEOUT) as client:
            yield SimpleNamespace(client=client, root=root, ref=reference)
    finally:
        serve.shutdown()
        ray.shutdown()


def replicas(client, tries: int = 40) -> dict[str, int]:
    """replica id -> pid, from /health answers (the proxy picks a replica at random: ask until two answered)."""
    seen: dict[str, int] = {}
    for _ in range(tries):
        response = client.get("/health")
        if response.status_code == 200:
            seen[response.json()["replica"]] = response.json()["pid"]
        if len(seen) == 2:
            break
    return seen


def until_both(client, request: dict, check, bound_s: float) -> None:
    """Send `request` until each of the two replicas gave an answer that passes `check` (bounded)."""
    passed: set[str] = set()
    deadline, sent = time.monotonic() + bound_s, 0
    while len(passed) < 2:
        assert time.monotonic() < deadline and sent < 2000, f"only replicas {passed} passed within {bound_s} s"
        response = client.post("/v1/generate", json=request)
        sent += 1
        if check(response):
            passed.add(response.headers[REPLICA_HEADER])
        else:  # a replica that has not seen the change yet
            time.sleep(0.05)


def test_answers_through_the_proxy_equal_single_runs(cluster):
    requests = [{"task": "alpha", "input": "name[Eagle]", "max_new_tokens": 8},
                {"task": "beta", "input": ["x", "mid size input"], "max_new_tokens": 10},
                {"task": "beta", "input": "beam me", "num_beams": 3, "max_new_tokens": 6},
                {"task": "alpha", "input": "sample", "do_sample": True, "seed": 3, "temperature": 1.5}]
    for req in requests:
        want = alone(cluster.ref, {"max_new_tokens": 8, **req})
        until_both(cluster.client, req, lambda r: r.status_code == 200 and [o["text"] for o in r.json()["outputs"]] == want,
                   STORE_BOUND_S)  # a wrong answer never passes: the bound fails the test
    assert len(replicas(cluster.client)) == 2


def test_store_changes_reach_both_replicas(cluster):
    root, ref, client = cluster.root, cluster.ref, cluster.client
    save_prefix(root / "delta", 4, 7)
    ref.add("delta", root / "delta")
    req = {"task": "delta", "input": "new task", "max_new_tokens": 6}
    want = alone(ref, req)
    until_both(client, req, lambda r: r.status_code == 200 and r.json()["outputs"][0]["text"] == want[0], STORE_BOUND_S)

    replace(root / "alpha", 5, 11)  # on-demand loading alone would keep serving the old alpha: the watch reloads
    ref.add("alpha", root / "alpha")
    req = {"task": "alpha", "input": "replaced", "max_new_tokens": 6}
    want = alone(ref, req)
    until_both(client, req, lambda r: r.status_code == 200 and r.json()["outputs"][0]["text"] == want[0], STORE_BOUND_S)

    shutil.rmtree(root / "delta")
    until_both(client, {"task": "delta", "input": "gone"}, lambda r: r.status_code == 404, STORE_BOUND_S)


def test_sigkilled_replica_is_restarted_and_no_request_hangs(cluster):
    client, ref = cluster.client, cluster.ref
    before = replicas(client)
    assert len(before) == 2, before
    victim_id, victim = sorted(before.items())[0]
    long_req = {"task": "beta", "input": "a long answer", "max_new_tokens": 200}
    statuses: list[tuple[int, str]] = []

    def in_flight():
        response = client.post("/v1/generate", json=long_req)  # raises on a hang (client timeout)
        statuses.append((response.status_code, response.text))

    # 16 = 2 replicas x max_ongoing_requests (8 here): the proxy fills both, so some rows are on the victim
    threads = [threading.Thread(target=in_flight) for _ in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)  # the rows are decoding on both replicas
    os.kill(victim, signal.SIGKILL)
    for thread in threads:
        thread.join(CLIENT_TIMEOUT + 5)
    assert len(statuses) == 16 and {code for code, _ in statuses} <= {200, 503}, statuses
    assert any(code == 503 and "replica_unavailable" in text for code, text in statuses), \
        f"no request was on the killed replica {victim_id}: {[c for c, _ in statuses]}"

    req = {"task": "beta", "input": "after the kill", "max_new_tokens": 6}
    want, codes = alone(ref, req), []
    deadline = time.monotonic() + RESTART_BOUND_S
    while True:
        assert time.monotonic() < deadline, f"no second replica within {RESTART_BOUND_S} s; answers {codes}"
        response = client.post("/v1/generate", json=req)
        codes.append(response.status_code)
        assert response.status_code in (200, 503), response.text
        if response.status_code == 200:
            assert response.json()["outputs"][0]["text"] == want[0]
        now = replicas(client, tries=10)
        if len(now) == 2 and victim not in now.values():
            break
        time.sleep(0.2)
    assert victim_id not in now
    until_both(client, req, lambda r: r.status_code == 200 and r.json()["outputs"][0]["text"] == want[0], 30)


def test_proxy_errors_get_the_server_shape_unless_a_replica_made_them():
    """_ProxyErrors alone (no Ray): a bare 500 becomes 503 replica_unavailable, Ray's backpressure 503 becomes
    503 queue_full, its 408 becomes 408 timeout; a replica's own error passes; every answer is marked."""
    from starlette.responses import PlainTextResponse

    async def bare(scope, receive, send):
        if scope["path"] == "/silent":  # how the proxy ends a request whose replica died: uvicorn answers 500
            return
        if scope["path"] == "/raises":
            raise RuntimeError("ActorDiedError")
        status, text = {"/full": (503, "Request dropped due to backpressure (num_queued_requests=1)."),
                        "/late": (408, "Request abc timed out after 1.0s.")}.get(scope["path"], (500, "Internal Server Error"))
        headers = {REPLICA_HEADER: "r1"} if scope["path"] == "/own" else {}
        await PlainTextResponse(text, status_code=status, headers=headers)(scope, receive, send)

    async def ask(path):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=_ProxyErrors(bare)), base_url="http://t") as c:
            return await c.get(path)

    def error(response, status, kind):
        assert response.status_code == status and response.json()["error"]["type"] == kind, response.text
        assert response.headers[PROXY_HEADER] == "1"
        return response

    for path in "/v1/generate", "/raises", "/silent":
        assert error(asyncio.run(ask(path)), 503, "replica_unavailable").headers["retry-after"] == "1"
    assert error(asyncio.run(ask("/full")), 503, "queue_full").headers["retry-after"] == "1"
    assert "retry-after" not in error(asyncio.run(ask("/late")), 408, "timeout").headers
    own = asyncio.run(ask("/own"))
    assert own.status_code == 500 and own.text == "Internal Server Error" and own.headers[PROXY_HEADER] == "1"


@pytest.mark.parametrize("marked", [True, False], ids=["middleware", "no-middleware"])
def test_the_start_sees_whether_the_proxy_has_the_middleware(marked):
    """missing_middleware against a stand-in proxy: None when /health carries PROXY_HEADER, else the fix."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            if marked:
                self.send_header(PROXY_HEADER, "1")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        problem = missing_middleware(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=5)
    finally:
        server.shutdown()
    if marked:
        assert problem is None
    else:
        assert f"{PROXY_CALLBACK_ENV}={PROXY_CALLBACK}" in problem and "ray start" in problem
    assert "cannot reach" in missing_middleware(f"http://127.0.0.1:{free_port()}", timeout_s=5)


def test_proxy_flags_need_ray_and_set_the_proxy_options():
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    base = ["--model", "m", "--prefix-dir", "p"]
    for extra, message in ((["--ray-address", "127.0.0.1:6379"], "--ray-address 127.0.0.1:6379 needs --ray"),
                           (["--ray-queue", "4"], "--ray-queue 4 needs --ray"),
                           (["--ray", "--ray-queue", "0"], "--ray-queue must be >= 1, got 0"),
                           (["--ray", "--ray-timeout-s", "0"], "--ray-timeout-s must be > 0 seconds, got 0.0")):
        with pytest.raises(ValueError, match=message):
            settings_from_args(parser.parse_args(base + extra))
    args = parser.parse_args(base + ["--ray", "--request-timeout-s", "50"])
    assert http_options(args)["request_timeout_s"] == 80  # behind the server's own 504
    args = parser.parse_args(base + ["--ray", "--ray-timeout-s", "2.5", "--ray-address", "10.0.0.1:6379"])
    assert http_options(args)["request_timeout_s"] == 2.5 and settings_from_args(args).store_poll_s == 2.0
