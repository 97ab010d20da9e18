"""`prefixtune serve --ray --ray-address ADDR` joins a Ray cluster started apart (`ray start --head`, 2 CPUs,
127.0.0.1, the proxy's middleware set in its environment as docs/serving.md says) with 1 replica of the tiny
server, and the proxy's limits hold: answers equal single runs; past --ray-queue the proxy answers 503
queue_full at once; past --ray-timeout-s it answers 408 timeout and the replica keeps serving; a stream whose
replica is SIGKILLed ends on the client, and once Ray restarted the replica the next request succeeds.

Every request has a client timeout and every loop a deadline. The cluster runs as `ray start --block` in its
own session, ended by its process group id (not `ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from conftest import save_tiny  # noqa: E402
from prefixtune import MultiPrefixModel  # noqa: E402
from prefixtune.base_model import load_base_model  # noqa: E402
from prefixtune.serve.ray_serve import PROXY_CALLBACK, PROXY_CALLBACK_ENV, PROXY_HEADER  # noqa: E402
from test_app import alone, save_prefix  # noqa: E402
from test_ray import free_port  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
PROXY_TIMEOUT_S = 6.0
"""--ray-timeout-s: well above a short answer on a busy 2-core machine, well below a 32 x 256-token request."""
START_BOUND_S = 240.0
RESTART_BOUND_S = 120.0
CLIENT_TIMEOUT = 30.0


def _end_group(proc: subprocess.Popen, first: int, grace_s: float) -> None:
    """Signal `proc`'s process group (its own session: only what it started), then SIGKILL what is left."""
    try:
        os.killpg(proc.pid, first)
        proc.wait(grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def _wait_started(url: str, server: subprocess.Popen, log) -> None:
    """Until /health answers 200 and the server printed its start line (after its middleware check)."""
    deadline = time.monotonic() + START_BOUND_S
    while True:
        assert server.poll() is None, f"the server exited ({server.returncode}): {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not started within {START_BOUND_S} s: {log.read_text()[-3000:]}"
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200 and "replicas on" in log.read_text():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)


@pytest.fixture(scope="module")
def joined(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefixes")
    save_prefix(root / "alpha", 3, 0)
    model = save_tiny(tmp_path_factory.mktemp("model") / "tiny")
    port, http_port = free_port(), free_port()
    # a token of its own (Ray's token auth), so that ~/.ray/auth_token, which any local ray.init may write, is
    # neither read nor changed: the cluster and the server share this one
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--port", str(port), "--node-ip-address", "127.0.0.1", "--num-cpus", "2",
         "--include-dashboard", "false", "--ray-client-server-port", str(free_port()),
         "--temp-dir", tempfile.mkdtemp(prefix="rc", dir="/tmp")],
        env={**env, PROXY_CALLBACK_ENV: PROXY_CALLBACK},  # the proxy's middleware comes from here only
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    log = tmp_path_factory.mktemp("log") / "serve.log"
    server = None
    try:
        with open(log, "w") as sink:  # the server's own environment lacks the variable: the cluster's counts
            server = subprocess.Popen(
                [sys.executable, "-m", "prefixtune", "serve", "--model", model, "--prefix-dir", str(root), "--ray",
                 "--ray-address", f"127.0.0.1:{port}", "--replicas", "1", "--port", str(http_port),
                 "--torch-threads", "1", "--max-batch-size", "1", "--default-new-tokens", "8", "--ray-queue", "1",
                 "--ray-timeout-s", str(PROXY_TIMEOUT_S)],
                env={k: v for k, v in env.items() if k != PROXY_CALLBACK_ENV}, stdout=sink, stderr=sink,
                start_new_session=True)
        url = f"http://127.0.0.1:{http_port}"
        _wait_started(url, server, log)
        reference = MultiPrefixModel(*load_base_model(model))
        reference.add("alpha", root / "alpha")
        with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT) as client:
            yield client, reference, log
    finally:
        if server is not None:
            _end_group(server, signal.SIGINT, 30)
        _end_group(head, signal.SIGTERM, 10)


def test_the_joined_cluster_answers_like_a_single_run(joined):
    client, ref, log = joined
    req = {"task": "alpha", "input": "name[Eagle]", "max_new_tokens": 8}
    response = client.post("/v1/generate", json=req)
    assert response.status_code == 200, response.text
    assert [o["text"] for o in response.json()["outputs"]] == alone(ref, req)
    assert response.headers[PROXY_HEADER] == "1"  # the cluster's proxy runs the middleware
    text = log.read_text()
    assert "on the Ray cluster at 127.0.0.1:" in text and "prefixtune serve: WARNING" not in text, text[-3000:]


def _concurrently(client, n: int, request: dict) -> list[tuple[int, str, float]]:
    """`n` requests at once: (status, body, seconds) each; a hang fails through the client timeout."""
    results: list[tuple[int, str, float]] = []

    def one():
        start = time.monotonic()
        response = client.post("/v1/generate", json=request)
        results.append((response.status_code, response.text, time.monotonic() - start))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_TIMEOUT + 5)
    return results


def test_past_the_proxy_queue_requests_get_503_queue_full_at_once(joined):
    client = joined[0]
    # 1 replica takes max_ongoing_requests (8) and the proxy queues 1 (--ray-queue): of 20, 11 or so are refused
    results = _concurrently(client, 20, {"task": "alpha", "input": "slow one", "max_new_tokens": 200})
    assert len(results) == 20 and {code for code, _, _ in results} <= {200, 408, 503}, results
    refused = [(json.loads(body)["error"]["type"], seconds) for code, body, seconds in results if code == 503]
    assert len(refused) >= 5 and {kind for kind, _ in refused} == {"queue_full"}, results
    assert max(seconds for _, seconds in refused) < PROXY_TIMEOUT_S, refused  # refused, not left waiting


def test_past_the_proxy_timeout_a_request_gets_408_and_the_replica_keeps_serving(joined):
    client, ref, _ = joined
    start = time.monotonic()
    response = client.post("/v1/generate", json={"task": "alpha", "input": ["long"] * 32, "max_new_tokens": 256})
    assert response.status_code == 408 and response.json()["error"]["type"] == "timeout", response.text
    assert time.monotonic() - start < PROXY_TIMEOUT_S + 10
    req = {"task": "alpha", "input": "after the timeout", "max_new_tokens": 6}
    after = client.post("/v1/generate", json=req)  # 200 in time only if the timed-out rows were cancelled
    assert after.status_code == 200 and after.json()["outputs"][0]["text"] == alone(ref, req)[0], after.text


def _read_until_cut(client, pid: int) -> tuple[list[str], str, float]:
    """Stream a long completion, SIGKILL replica `pid` after its first event, read on: (lines, how it ended,
    seconds from the kill to the end)."""
    lines, ended, killed = [], "closed", None
    body = {"model": "alpha", "prompt": "stream me", "max_tokens": 256, "stream": True}
    try:
        with client.stream("POST", "/v1/completions", json=body, timeout=httpx.Timeout(20.0)) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                lines.append(line)
                if killed is None and line.startswith("data: "):
                    os.kill(pid, signal.SIGKILL)
                    killed = time.monotonic()
    except httpx.TransportError as err:  # the connection cut mid-body: also an end
        ended = type(err).__name__
    assert killed is not None, f"the stream ended before its first event: {lines}"
    return lines, ended, time.monotonic() - killed


def test_a_stream_cut_by_a_killed_replica_ends_and_the_next_request_succeeds(joined):
    client, ref, _ = joined
    pid = client.get("/health").json()["pid"]
    lines, ended, after_kill = _read_until_cut(client, pid)
    # ended by the kill, not by the proxy's timeout (which would end it too, PROXY_TIMEOUT_S after its start)
    assert after_kill < PROXY_TIMEOUT_S / 2, (after_kill, ended, lines[-3:])
    assert "data: [DONE]" not in lines, (ended, lines[-3:])  # cut short, not finished

    req = {"task": "alpha", "input": "after the kill", "max_new_tokens": 6}
    deadline, codes = time.monotonic() + RESTART_BOUND_S, []
    while True:  # until the restart: 503 (no replica) or 408 (waited in the proxy's queue past its timeout)
        assert time.monotonic() < deadline, f"no restarted replica within {RESTART_BOUND_S} s: {codes}"
        response = client.post("/v1/generate", json=req)
        codes.append(response.status_code)
        assert response.status_code in (200, 408, 503), response.text
        if response.status_code == 200:
            break
        time.sleep(0.5)
    assert response.json()["outputs"][0]["text"] == alone(ref, req)[0]
    assert client.get("/health").json()["pid"] != pid
    print(f"stream: {len(lines)} lines, ended ({ended}) {after_kill:.2f} s after the kill; then {codes}")
