"""`prefixtune serve` over HTTP with a tiny model: uvicorn on a free loopback port (or httpx's ASGI transport).

Every generated text is checked against `MultiPrefixModel.generate` on the same single input, run on a
second copy of the model. Waits are bounded polls; the in-flight cases hold the worker still with the
tokenizer lock it takes once per streamed token, instead of relying on timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn

from conftest import byte_tokenizer, tiny_model
from prefixtune import GenerateConfig, MultiPrefixModel, PrefixConfig, PrefixTuningModel
from prefixtune.config import TextFormat
from prefixtune.serve import ServeSettings, add_cli_arguments, cli_main, create_app, settings_from_args

TIMEOUT = 60.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_prefix(directory, length: int, seed: int, fmt: TextFormat | None = None) -> None:
    """A random prefix for the served shape, made on its own model instance (the served one stays untouched)."""
    ptm = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=length, reparam="table", seed=seed),
                            text_format=fmt)
    with torch.no_grad():
        for enc in ptm.encoders.values():
            enc.table.mul_(3.0)
    ptm.save_pretrained(directory)


class LiveServer:
    """uvicorn on a free loopback port in a thread, lifespan on (so the batching worker runs)."""

    def __init__(self, app, lifespan: str = "on"):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan=lifespan))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive())
        assert self.server.started, "uvicorn did not start"
        return f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)


def wait_until(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefixes")
    save_prefix(root / "alpha", 3, 0)
    save_prefix(root / "beta", 6, 1, TextFormat(source="{input} =>{eos}"))
    save_prefix(root / "gamma", 1, 2)
    (root / "notes").mkdir()  # not a saved prefix: not a task
    settings = ServeSettings(prefix_dir=root, max_batch_size=4, max_wait_ms=20, max_new_tokens=64,
                             default_new_tokens=16, max_input_tokens=40, max_inputs_per_request=4)
    app = create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()), settings)
    reference = MultiPrefixModel(tiny_model("llama"), byte_tokenizer())
    for name in ("alpha", "beta", "gamma"):
        reference.add(name, root / name)
    with LiveServer(app) as url:
        yield SimpleNamespace(url=url, app=app, root=root, ref=reference)


def config_of(req: dict, index: int = 0) -> GenerateConfig:
    """The GenerateConfig a request means (server defaults: greedy, 16 new tokens; input k samples with seed + k)."""
    seed = req.get("seed")
    return GenerateConfig(num_beams=req.get("num_beams", 1), max_new_tokens=req.get("max_new_tokens", 16),
                          min_new_tokens=req.get("min_new_tokens", 0), do_sample=req.get("do_sample", False),
                          temperature=req.get("temperature", 1.0), top_p=req.get("top_p", 1.0),
                          block_newlines=req.get("block_newlines", True), seed=None if seed is None else seed + index)


def alone(ref: MultiPrefixModel, req: dict) -> list[str]:
    inputs = [req["input"]] if isinstance(req["input"], str) else req["input"]
    return [ref.generate([x], [req["task"]], config_of(req, k))[0] for k, x in enumerate(inputs)]


def sse_events(lines) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in lines:
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: "):])))
    return events


REQUESTS = [
    {"task": "alpha", "input": "name[Eagle]", "max_new_tokens": 8},
    {"task": "beta", "input": "a longer input text", "max_new_tokens": 12, "min_new_tokens": 3},
    {"task": "gamma", "input": "hi", "max_new_tokens": 5, "block_newlines": False},
    {"task": "alpha", "input": ["x", "mid size input"], "max_new_tokens": 10},
    {"task": "beta", "input": "beam me", "num_beams": 3, "max_new_tokens": 6},
    {"task": "gamma", "input": "sample", "do_sample": True, "seed": 3, "temperature": 1.5, "max_new_tokens": 7},
    {"task": "beta", "input": ["q", "rr"], "do_sample": True, "seed": 8, "top_p": 0.8},
    {"task": "gamma", "input": "default options"},
    {"task": "alpha", "input": "beam two", "num_beams": 2, "max_new_tokens": 4},
    {"task": "beta", "input": "last one", "max_new_tokens": 20},
]


def test_concurrent_mixed_task_requests_equal_alone(live):
    async def send_all():
        async with httpx.AsyncClient(base_url=live.url, timeout=TIMEOUT) as client:
            return await asyncio.gather(*(client.post("/v1/generate", json=r) for r in REQUESTS))

    for req, resp in zip(REQUESTS, asyncio.run(send_all())):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert [o["text"] for o in body["outputs"]] == alone(live.ref, req), req
        assert all(o["input_tokens"] > 0 and 0 < o["output_tokens"] <= config_of(req).max_new_tokens
                   for o in body["outputs"])
        assert body["task"] == req["task"] and body["timing"]["total_ms"] >= body["timing"]["queue_ms"] >= 0


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "seed": 5, "temperature": 1.4}], ids=["greedy", "sampling"])
def test_stream_equals_non_stream(live, options):
    req = {"task": "beta", "input": ["stream me", "and me too"], "max_new_tokens": 12, **options}
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as client:
        plain = client.post("/v1/generate", json=req).json()
        with client.stream("POST", "/v1/generate", json={**req, "stream": True}) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            events = sse_events(resp.iter_lines())
    assert [k for k, _ in events[:-1]] == ["token"] * (len(events) - 1) and events[-1][0] == "done"
    final = events[-1][1]["outputs"]
    assert [o["text"] for o in final] == [o["text"] for o in plain["outputs"]] == alone(live.ref, req)
    for i, out in enumerate(final):
        deltas = [d for k, d in events if k == "token" and d["index"] == i]
        assert len(deltas) == out["output_tokens"]
        assert out["text"].startswith("".join(d["text"] for d in deltas).strip())


def test_bad_requests_get_clear_errors(live):
    def check(resp, status: int, kind: str, *words: str) -> None:
        assert resp.status_code == status, resp.text
        error = resp.json()["error"]
        assert error["type"] == kind, error
        for word in words:
            assert word in error["message"], error

    ok = {"task": "alpha", "input": "x"}
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        post = lambda **body: c.post("/v1/generate", json=body)  # noqa: E731
        check(c.post("/v1/generate", content=b'{"task": "alpha", ', headers={"content-type": "application/json"}),
              400, "invalid_json", "not valid JSON")
        check(post(task="nope", input="x"), 404, "unknown_task", "'nope'", "alpha")
        check(post(task="alpha", input="x" * 100), 400, "input_too_long", "input 0 has", "at most 40")
        check(post(task="alpha", input=["fine", "y" * 100]), 400, "input_too_long", "input 1 has")
        check(post(**ok, max_new_tokens="many"), 422, "invalid_request", "max_new_tokens", "'many'")
        check(post(**ok, colour="red"), 422, "invalid_request", "colour")
        check(post(task="alpha"), 422, "invalid_request", "input", "Field required")
        check(post(**ok, max_new_tokens=500), 400, "invalid_request", "500", "limit of 64")
        check(post(**ok, num_beams=0), 400, "invalid_request", "num_beams must be >= 1, got 0")
        check(post(**ok, num_beams=2, stream=True), 400, "invalid_request", "stream=true needs num_beams=1")
        check(post(**ok, num_beams=2, do_sample=True), 400, "invalid_request", "num_beams=2")
        check(post(task="alpha", input=[]), 400, "invalid_request", "0 items")
        check(post(task="alpha", input=["a"] * 5), 400, "invalid_request", "5 items", "1 to 4")
        check(post(task="alpha", input="   "), 400, "invalid_request", "input 0 is empty")
        check(post(task="../alpha", input="x"), 400, "invalid_task_name", "'../alpha'")
        check(c.post("/v1/generate", content=b"x" * (2 << 20)), 413, "body_too_large", "limit is")
        check(c.put("/v1/tasks/.hidden"), 400, "invalid_task_name", "'.hidden'")
        check(c.put("/v1/tasks/notes"), 404, "prefix_not_found", "'notes'")
        check(c.put("/v1/tasks/missing"), 404, "prefix_not_found", "'missing'")
        check(c.delete("/v1/tasks/nope"), 404, "unknown_task", "'nope'")
        check(c.get("/v1/nothing"), 404, "not_found")
        assert "notes" not in {t["name"] for t in c.get("/v1/tasks").json()["tasks"]}


def test_prefix_outside_the_directory_is_refused(live, tmp_path):
    save_prefix(tmp_path / "outside", 2, 9)
    link = live.root / "sneaky"
    link.symlink_to(tmp_path / "outside", target_is_directory=True)
    try:
        with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
            resp = c.put("/v1/tasks/sneaky")
            assert resp.status_code == 400 and "outside the prefix directory" in resp.json()["error"]["message"]
            assert "sneaky" not in {t["name"] for t in c.get("/v1/tasks").json()["tasks"]}
    finally:
        link.unlink()


def test_hot_load_while_requests_are_in_flight(live):
    batcher, root, ref = live.app.state.batcher, live.root, live.ref
    save_prefix(root / "epsilon", 4, 20)
    ref.add("epsilon-old", root / "epsilon")
    req = {"task": "epsilon", "input": "in flight", "max_new_tokens": 64, "min_new_tokens": 64}
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        assert c.put("/v1/tasks/epsilon").status_code == 201
        with c.stream("POST", "/v1/generate", json={**req, "stream": True}) as resp:
            lines = resp.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # a first token: the row is decoding
            with batcher.tokenizer_lock:  # the worker halts at its next token, so the row stays in flight
                assert batcher.active_rows == 1
                save_prefix(root / "epsilon", 4, 21)
                reload = c.put("/v1/tasks/epsilon")
                save_prefix(root / "zeta", 2, 22)
                added = c.put("/v1/tasks/zeta")
            events = sse_events(lines)
        assert reload.status_code == 200 and reload.json()["prefix_length"] == 4
        assert added.status_code == 201 and added.json()["name"] == "zeta"
        old = ref.generate([req["input"]], ["epsilon-old"], config_of(req))[0]
        assert events[-1][0] == "done" and events[-1][1]["outputs"][0]["text"] == old  # kept its prefix
        ref.add("epsilon", root / "epsilon")
        ref.add("zeta", root / "zeta")
        for task in ("epsilon", "zeta"):
            body = c.post("/v1/generate", json={**req, "task": task}).json()
            assert body["outputs"][0]["text"] == alone(ref, {**req, "task": task})[0]
        assert alone(ref, req)[0] != old  # the reload changed what the task generates
        assert c.delete("/v1/tasks/zeta").json() == {"deleted": "zeta"}
        assert c.post("/v1/generate", json={**req, "task": "zeta"}).status_code == 404


def test_client_disconnect_cancels_its_row(live):
    batcher, metrics = live.app.state.batcher, live.app.state.metrics
    before = metrics.cancelled_rows
    req = {"task": "alpha", "input": "bye", "max_new_tokens": 64, "min_new_tokens": 64, "stream": True}
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        with _Hold(batcher.tokenizer_lock) as hold:
            with c.stream("POST", "/v1/generate", json=req) as resp:
                next(line for line in resp.iter_lines() if line.startswith("data: "))
                hold.acquire()  # the row cannot reach its 64 tokens now; leaving the block disconnects
            wait_until(lambda: metrics.cancelled_rows > before or any(r.cancelled for r in batcher._running))
    wait_until(lambda: metrics.cancelled_rows == before + 1 and batcher.active_rows == 0)


class _Hold:
    """Releases the lock on exit if `acquire` was called (so a failing assertion cannot wedge the worker)."""

    def __init__(self, lock: threading.Lock):
        self.lock, self.held = lock, False

    def acquire(self) -> None:
        self.lock.acquire()
        self.held = True

    def __enter__(self) -> "_Hold":
        return self

    def __exit__(self, *exc) -> None:
        if self.held:
            self.lock.release()


def test_health_and_openapi(live):
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        assert c.post("/v1/generate", json={"task": "gamma", "input": "count me"}).status_code == 200
        health = c.get("/health").json()
        assert health["status"] == "ok" and health["tasks"] >= 3 and health["queue_depth"] == 0
        paths = set(c.get("/openapi.json").json()["paths"])  # the exposition itself: tests/serve/test_metrics.py
    assert {"/v1/generate", "/v1/tasks", "/v1/tasks/{name}", "/health", "/metrics", "/v1/models", "/v1/completions",
            "/v1/chat/completions"} <= paths


def _app(tmp_path, **settings):
    save_prefix(tmp_path / "alpha", 2, 0)
    return create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()), ServeSettings(prefix_dir=tmp_path, **settings))


def _asgi_calls(app, calls):
    """Run `calls(client)` against the app in-process (no lifespan: the batching worker is not started)."""
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=TIMEOUT) as client:
            return await calls(client)
    return asyncio.run(run())


def test_full_queue_answers_429_and_timeout_cancels(tmp_path):
    app = _app(tmp_path, max_queue=2, request_timeout_s=1.0, retry_after_s=3)
    batcher = app.state.batcher

    async def calls(c):
        waiting = asyncio.create_task(c.post("/v1/generate", json={"task": "alpha", "input": ["one", "two"]}))
        deadline = time.monotonic() + TIMEOUT
        while batcher.queue_depth < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return await c.post("/v1/generate", json={"task": "alpha", "input": "three"}), await waiting

    full, timed_out = _asgi_calls(app, calls)
    assert full.status_code == 429 and full.headers["retry-after"] == "3"
    assert full.json()["error"]["type"] == "queue_full" and "retry later" in full.json()["error"]["message"]
    assert timed_out.status_code == 504 and timed_out.json()["error"]["type"] == "timeout"
    assert batcher.queue_depth == 0 and app.state.metrics.cancelled_rows == 2
    requests = lambda status: app.state.metrics.total("prefixtune_requests_total", status=status)  # noqa: E731
    assert requests("429") == requests("504") == 1


def test_disconnect_while_queued_cancels(tmp_path):
    app = _app(tmp_path)
    with LiveServer(app, lifespan="off") as url:  # no worker: the row waits until its client leaves
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/generate", json={"task": "alpha", "input": "x"}, timeout=httpx.Timeout(TIMEOUT, read=1.0))
        wait_until(lambda: app.state.metrics.cancelled_rows == 1 and app.state.batcher.queue_depth == 0)
        wait_until(lambda: app.state.metrics.total("prefixtune_requests_total", status="499") == 1)


def test_api_key(tmp_path):
    app = _app(tmp_path, api_key="s3cret")

    async def calls(c):
        return [await c.get("/v1/tasks"), await c.get("/v1/tasks", headers={"Authorization": "Bearer nope"}),
                await c.get("/v1/tasks", headers={"Authorization": "Bearer s3cret"}),
                await c.get("/v1/tasks", headers={"X-API-Key": "s3cret"}), await c.get("/metrics"),
                await c.post("/v1/generate", content=b"{not json"), await c.get("/health")]

    missing, wrong, bearer, header, metrics, bad_json_no_key, health = _asgi_calls(app, calls)
    for resp in (missing, wrong, metrics, bad_json_no_key):
        assert resp.status_code == 401 and resp.json()["error"]["type"] == "unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    assert bearer.status_code == header.status_code == 200 and [t["name"] for t in bearer.json()["tasks"]] == ["alpha"]
    assert health.json()["status"] == "worker_stopped"  # open without a key; the worker only runs under a lifespan


def test_cli_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PREFIXTUNE_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--prefix-dir", str(tmp_path), "--max-batch-size", "8", "--one-task-per-batch"])
    settings = settings_from_args(args)
    assert (settings.max_batch_size, settings.mix_tasks, settings.api_key, args.host) == (8, False, "from-env", "127.0.0.1")
    assert cli_main(parser.parse_args(["--prefix-dir", str(tmp_path), "--prefix", "no-equals-sign"])) == 2
    assert "NAME=PATH" in capsys.readouterr().err
    assert cli_main(parser.parse_args(["--prefix-dir", str(tmp_path / "absent")])) == 2
    assert cli_main(parser.parse_args(["--prefix-dir", str(tmp_path), "--max-queue", "0"])) == 2


@pytest.mark.parametrize("mode, measured, expected", [("off", True, False), ("on", False, True),
                                                       ("auto", True, True), ("auto", False, False)])
def test_bf16_setting_decides_once_on_a_decoding_step_of_the_batch_size(tmp_path, monkeypatch, mode, measured, expected):
    """--bf16 on/off are taken as given; auto asks precision on this model's decoding step at max_batch_size rows."""
    from prefixtune import precision

    asked = []

    def decide(workload):
        asked.append(workload.key)
        return SimpleNamespace(bf16=measured)

    monkeypatch.setattr(precision, "decide", decide)
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    multi = MultiPrefixModel(tiny_model("llama"), byte_tokenizer())
    app = create_app(multi, ServeSettings(prefix_dir=tmp_path, max_batch_size=12, bf16=mode))
    assert app.state.batcher.bf16 is expected
    assert asked == ([] if mode != "auto" else [asked[0]])
    assert mode != "auto" or ("decode" in asked[0] and asked[0].endswith(f"rows{precision.shape_bucket(12)}"))
    with pytest.raises(ValueError, match="bf16 must be one of .* got 'yes'"):
        ServeSettings(bf16="yes").validate()
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    assert settings_from_args(parser.parse_args(["--prefix-dir", str(tmp_path), "--bf16", "auto"])).bf16 == "auto"
