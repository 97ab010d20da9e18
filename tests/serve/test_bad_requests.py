"""Hostile and careless requests (issue 15): each gets a JSON answer naming what was wrong, and no other
request is harmed. The innocents' texts are checked against the same request run alone.

Three layers: the scheduler alone (a row that reaches the batch and fails there fails alone), a table of
bad requests and files against one live server, and a time-bounded fuzz of every request field.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import threading
import time

import httpx
import pytest
import torch

from conftest import byte_tokenizer, tiny_model
from prefixtune import GenerateConfig, MultiPrefixModel
from prefixtune.serve import ServeSettings, add_cli_arguments, cli_main, create_app, settings_from_args
from prefixtune.serve.metrics import Metrics
from prefixtune.serve.scheduler import Batcher
from prefixtune.serve.schema import GenerateRequest
from test_app import TIMEOUT, LiveServer, alone, save_prefix, sse_events, wait_until
from test_scheduler import Collector, _multi, _rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INNOCENTS = [{"task": "alpha", "input": f"innocent input {i}", "max_new_tokens": 24, "min_new_tokens": 12}
             for i in range(3)] + [{"task": "beta", "input": "a sampled one", "do_sample": True, "seed": 4,
                                    "max_new_tokens": 24, "min_new_tokens": 12}]


# --- the scheduler: a row that fails in the batch fails alone ----------------------------------------
def _innocent_cases() -> list[tuple[str, str, GenerateConfig]]:
    greedy = GenerateConfig(num_beams=1, max_new_tokens=10, min_new_tokens=10)
    sampled = GenerateConfig(num_beams=1, max_new_tokens=10, min_new_tokens=10, do_sample=True, seed=7)
    return [("t0", "one", greedy), ("t1", "two two", greedy), ("t2", "three", sampled), ("t0", "four", greedy)]


def _check_innocents(multi, cases: dict[int, tuple], sink) -> None:
    for i, (task, text, cfg) in cases.items():
        kind, data = sink.final(i)
        assert kind == "done", f"innocent row {i} failed: {data}"
        assert data["text"] == multi.generate([text], [task], cfg)[0], f"innocent row {i} differs from alone"
        tokens = [d for k, d in sink.events[i] if k == "token"]
        assert len(tokens) == data["output_tokens"], f"row {i}: tokens streamed twice or lost"
        assert "".join(d["text"] for d in tokens).strip() == data["text"]


@pytest.mark.parametrize("attack", [
    GenerateConfig(num_beams=1, do_sample=True, seed=2**64, max_new_tokens=5),  # refused by the random generator
    GenerateConfig(num_beams=1, do_sample=True, temperature=1e-300, max_new_tokens=5),  # NaN probabilities
], ids=["seed-2**64-joins", "temperature-1e-300-steps"])
def test_a_row_failing_in_the_batch_fails_alone(attack):
    """The issue's attacks with validation bypassed: one fails joining, one fails a step (then every row of
    the step is decoded again alone); the four rows already decoding finish as if alone."""
    multi, sink = _multi("llama"), Collector()
    batcher = Batcher(multi, Metrics(), max_batch_size=16, max_wait_s=0.01, max_queue=32)  # driven by hand
    cases = _innocent_cases()
    batcher.admit(_rows(multi, cases, sink))
    for _ in range(3):
        batcher.step()
    batcher.admit(_rows(multi, [("t1", "attacker", attack), ("t2", "joins with it", cases[0][2])], sink, start=4))
    while batcher.active_rows:
        batcher.step()
    assert sink.final(4)[0] == "error" and "generation failed" in sink.final(4)[1]["message"]
    _check_innocents(multi, {**dict(enumerate(cases)), 5: ("t2", "joins with it", cases[0][2])}, sink)


def test_static_group_failing_retries_its_rows_alone():
    """Encoder-decoder rows go through generate in groups of equal options (the seed is not one of them):
    a group that fails is retried row by row, so only the attacker fails."""
    multi, sink = _multi("t5"), Collector()
    batcher = Batcher(multi, Metrics(), max_batch_size=8, max_wait_s=0.05, max_queue=8)
    greedy = GenerateConfig(num_beams=1, max_new_tokens=6, min_new_tokens=0)
    cases = [("t0", "attacker", GenerateConfig(num_beams=1, max_new_tokens=6, min_new_tokens=0, seed=2**64)),
             ("t1", "one", greedy), ("t2", "two words", greedy)]
    batcher.submit(_rows(multi, cases, sink, stream=False))
    batcher.start()
    try:
        wait_until(lambda: sink.finished(3))
    finally:
        batcher.stop()
    assert sink.final(0)[0] == "error" and "Overflow" in sink.final(0)[1]["message"]
    for i in (1, 2):
        task, text, cfg = cases[i]
        assert sink.final(i) == ("done", sink.final(i)[1]) and sink.final(i)[1]["text"] == \
            multi.generate([text], [task], cfg)[0]


# --- one live server: a table of bad requests and files, each sent while four innocents decode -------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefixes")
    save_prefix(root / "alpha", 3, 0)
    save_prefix(root / "beta", 6, 1)
    for name in ("truncated", "not-json"):
        save_prefix(root / name, 3, 2)
    weights = root / "truncated" / "prefix.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    (root / "not-json" / "prefix_config.json").write_text("{broken", encoding="utf-8")
    settings = ServeSettings(prefix_dir=root, max_batch_size=8, max_wait_ms=20, max_new_tokens=64,
                             default_new_tokens=16, max_input_tokens=40, max_inputs_per_request=4, max_beams=4,
                             max_lanes_per_request=8, body_timeout_s=0.5)
    app = create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()), settings)  # starts: broken ones skipped
    reference = MultiPrefixModel(tiny_model("llama"), byte_tokenizer())
    for name in ("alpha", "beta"):
        reference.add(name, root / name)
    with LiveServer(app) as url:
        yield argparse.Namespace(url=url, app=app, root=root, ref=reference,
                                 expected=[alone(reference, r) for r in INNOCENTS])


async def _with_innocents(live, client: httpx.AsyncClient, bad_calls) -> list[httpx.Response]:
    """Start the four innocents, send the bad calls while they decode; check the innocents; the bad answers."""
    innocents = [asyncio.create_task(client.post("/v1/generate", json=r)) for r in INNOCENTS]
    await asyncio.sleep(0.05)
    answers = await asyncio.gather(*(call(client) for call in bad_calls))
    for req, resp, want in zip(INNOCENTS, await asyncio.gather(*innocents), live.expected):
        assert resp.status_code == 200, f"innocent {req} harmed: {resp.text}"
        assert [o["text"] for o in resp.json()["outputs"]] == want, f"innocent {req} differs from alone"
    return answers


def _post(body) -> callable:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()  # NaN/Infinity literals, \ud800 escapes
    return lambda c: c.post("/v1/generate", content=raw, headers={"content-type": "application/json"})


def _gen(**fields) -> dict:
    return {"task": "alpha", "input": "x", **fields}


BAD_REQUESTS = [  # (id, body, status, error type)
    ("seed-2**64", _gen(do_sample=True, seed=18446744073709551616), 400, "invalid_request"),
    ("seed-negative", _gen(do_sample=True, seed=-1), 400, "invalid_request"),
    ("temperature-1e-300", _gen(do_sample=True, temperature=1e-300), 400, "invalid_request"),
    ("temperature-nan", _gen(do_sample=True, temperature=math.nan), 400, "invalid_request"),
    ("temperature-inf", _gen(do_sample=True, temperature=math.inf), 400, "invalid_request"),
    ("top_p-0", _gen(do_sample=True, top_p=0.0), 400, "invalid_request"),
    ("top_p-nan", _gen(do_sample=True, top_p=math.nan), 400, "invalid_request"),
    ("length_penalty-inf", _gen(num_beams=2, length_penalty=-math.inf), 400, "invalid_request"),
    ("num_beams-10**9", _gen(num_beams=10**9), 400, "invalid_request"),
    ("num_beams-over-max_beams", _gen(num_beams=5), 400, "invalid_request"),
    ("rows-x-beams-over-limit", _gen(input=["a", "b", "c"], num_beams=3), 400, "invalid_request"),
    ("max_new_tokens-10**30", _gen(max_new_tokens=10**30), 400, "invalid_request"),
    ("min_new_tokens-over-max", _gen(max_new_tokens=4, min_new_tokens=5), 400, "invalid_request"),
    ("lone-surrogate-input", _gen(input="abc \ud800"), 400, "invalid_request"),
    ("lone-surrogate-task", _gen(task="\ud800"), 400, "invalid_task_name"),
    ("huge-prompt", _gen(input="y" * 960_000), 400, "input_too_long"),
    ("empty-list", _gen(input=[]), 400, "invalid_request"),
    ("not-an-object", [1, 2], 422, "invalid_request"),
    ("unknown-field", _gen(beams=3), 422, "invalid_request"),
    ("bad-json", b'{"task": "alpha", "input": ', 400, "invalid_json"),
]


@pytest.mark.parametrize("body,status,kind", [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_answered_alone(live, body, status, kind):
    async def run():
        async with httpx.AsyncClient(base_url=live.url, timeout=TIMEOUT) as client:
            return (await _with_innocents(live, client, [_post(body)]))[0]

    resp = asyncio.run(run())
    assert (resp.status_code, resp.json()["error"]["type"]) == (status, kind), resp.text
    assert resp.json()["error"]["message"]


def test_huge_prompt_is_refused_before_tokenizing(live):
    resp = httpx.post(f"{live.url}/v1/generate", json=_gen(input="y" * 960_000), timeout=TIMEOUT)
    assert resp.status_code == 400 and "960000 characters" in resp.json()["error"]["message"]


@pytest.mark.parametrize("name", ["truncated", "not-json", "unreadable"])
def test_broken_prefix_is_skipped_at_start_and_refused_by_put(live, name, monkeypatch):
    if name == "unreadable":  # an error the loader does not turn into ValueError (a reader's own, an OSError)
        save_prefix(live.root / name, 3, 2)  # after the start, so only PUT loads it
        multi, add = live.app.state.tasks.multi, live.app.state.tasks.multi.add
        monkeypatch.setattr(multi, "add", lambda n, p, *a: add(n, p, *a) if n != name else (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(p))))
    async def run():
        async with httpx.AsyncClient(base_url=live.url, timeout=TIMEOUT) as client:
            return await _with_innocents(live, client, [lambda c: c.put(f"/v1/tasks/{name}"), lambda c: c.get("/v1/tasks")])

    put, listing = asyncio.run(run())
    assert put.status_code == 422 and put.json()["error"]["type"] == "invalid_prefix", put.text
    assert str(live.root) not in put.text and str(live.root.resolve()) not in put.text
    assert [t["name"] for t in listing.json()["tasks"]] == ["alpha", "beta"]


def test_task_listing_shows_no_server_paths(live):
    text = httpx.get(f"{live.url}/v1/tasks", timeout=TIMEOUT).text
    assert str(live.root.resolve()) not in text and str(live.root) not in text
    assert [t["source"] for t in json.loads(text)["tasks"]] == ["prefix_dir/alpha", "prefix_dir/beta"]


def test_body_shorter_than_its_content_length_gets_408(live):
    host, port = live.url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10.0) as sock:  # body_timeout_s is 0.5
        sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"task\": \"alpha\"")
        answer = b""
        while b"}}" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer
    assert time.monotonic() - start < 10.0


def test_tokenizing_runs_off_the_event_loop(live):
    """While a request's tokenization is held up (its tokenizer lock taken here), other requests are answered."""
    batcher, result = live.app.state.batcher, {}

    def send():
        result["resp"] = httpx.post(f"{live.url}/v1/generate", json=INNOCENTS[0], timeout=TIMEOUT)

    sender = threading.Thread(target=send)
    with batcher.encoder_lock:
        sender.start()
        time.sleep(0.2)  # the request is now waiting for the lock, in a worker thread (or on the loop: a bug)
        health = httpx.get(f"{live.url}/health", timeout=3.0)
    sender.join(TIMEOUT)
    assert health.status_code == 200
    assert [o["text"] for o in result["resp"].json()["outputs"]] == live.expected[0]


# --- keys, limits on beams --------------------------------------------------------------------------
def test_api_key_needs_the_bearer_scheme(tmp_path):
    save_prefix(tmp_path / "alpha", 2, 0)
    app = create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()), ServeSettings(prefix_dir=tmp_path, api_key="s3cret"))
    headers = [{"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}, {"Authorization": "Bearer"},
               {"Authorization": "Bearer s3cret"}, {"Authorization": "bearer s3cret"}, {"X-API-Key": "s3cret"}]

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return [(await client.get("/v1/tasks", headers=h)).status_code for h in headers]

    assert asyncio.run(calls()) == [401, 401, 401, 200, 200, 200]


@pytest.mark.parametrize("argv,env,file_text,message", [
    (["--api-key", ""], None, None, "visible"), (["--api-key", "k"], None, None, "ps"),
    ([], "", None, "empty"), ([], "  ", None, "empty"), (["--api-key-file", "{file}"], None, "\n", "empty"),
    (["--api-key-file", "{file}.absent"], None, None, "cannot read"),
], ids=["argv-empty", "argv-key", "env-empty", "env-blank", "file-empty", "file-missing"])
def test_api_key_only_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys, argv, env, file_text, message):
    monkeypatch.delenv("PREFIXTUNE_API_KEY", raising=False)
    if env is not None:
        monkeypatch.setenv("PREFIXTUNE_API_KEY", env)
    key_file = tmp_path / "key"
    if file_text is not None:
        key_file.write_text(file_text, encoding="utf-8")
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    # a model that cannot load: were the key accepted, serve would fail there instead of serving forever
    args = parser.parse_args(["--prefix-dir", str(tmp_path), "--model", str(tmp_path / "no-model")]
                             + [a.format(file=key_file) for a in argv])
    with pytest.raises(ValueError, match=message):
        settings_from_args(args)
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_api_key_file_and_environment(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    monkeypatch.setenv("PREFIXTUNE_API_KEY", "from-env")
    (tmp_path / "key").write_text("from-file\n", encoding="utf-8")
    with_file = parser.parse_args(["--prefix-dir", str(tmp_path), "--api-key-file", str(tmp_path / "key")])
    assert settings_from_args(with_file).api_key == "from-file"
    assert settings_from_args(parser.parse_args(["--prefix-dir", str(tmp_path)])).api_key == "from-env"
    with pytest.raises(ValueError, match="empty"):
        ServeSettings(api_key="").validate()


def test_timed_out_beam_group_leaves_the_batch(tmp_path):
    """A beam request that times out is cancelled between steps: its lanes leave at once, not at its end."""
    save_prefix(tmp_path / "alpha", 2, 0)
    model = tiny_model("llama")
    model.model.register_forward_pre_hook(lambda *_: time.sleep(0.02))  # ~6 s for the long request below
    settings = ServeSettings(prefix_dir=tmp_path, request_timeout_s=1.0, max_new_tokens=300, max_beams=4)
    app = create_app(MultiPrefixModel(model, byte_tokenizer()), settings)
    engine = app.state.batcher.engine
    with LiveServer(app) as url:
        long = httpx.post(f"{url}/v1/generate", timeout=TIMEOUT,
                          json=_gen(num_beams=4, max_new_tokens=290, min_new_tokens=290))
        assert long.status_code == 504 and long.json()["error"]["type"] == "timeout"
        wait_until(lambda: engine.lanes == 0, timeout=1.0)
        short = httpx.post(f"{url}/v1/generate", json=_gen(num_beams=2, max_new_tokens=3), timeout=TIMEOUT)
        assert short.status_code == 200, short.text


def test_request_schema_bounds_are_documented():
    """Each bounded numeric field says its range in the OpenAPI schema (what /docs shows)."""
    fields = GenerateRequest.model_json_schema()["properties"]
    for name in ("temperature", "top_p", "length_penalty", "seed"):
        assert " to " in fields[name]["description"], name


# --- fuzz: random JSON values for every field --------------------------------------------------------
FUZZ_SECONDS = float(os.environ.get("PREFIXTUNE_FUZZ_SECONDS", "12"))
"""Time budget of the fuzz (CI default); set PREFIXTUNE_FUZZ_SECONDS higher for a longer search."""
_NUMBERS = [0, 1, -1, 2, 3, 4, 5, 9, 64, 65, 2**31, 2**63 - 1, 2**63, 2**64, -(2**64), 10**400, 0.0, -0.0, 5e-324,
            1e-300, 0.01, 0.5, 1.0, 1.7, 99.9, 1e300, math.nan, math.inf, -math.inf]
_TEXTS = ["", " ", "x", "name[Eagle]", "abc \ud800", "\udfff", "é中\U0001F600", "\x00", "alpha", "beta", "gamma",
          "../alpha", "a" * 300, "NaN", "1", "true", [], ["x"], ["x", "y z"], ["x"] * 5, [""], ["abc \ud800"]]
_OTHER = [None, True, False, [1, 2], [None], [["x"]], {}, {"a": 1}]
_KIND = {"task": _TEXTS, "input": _TEXTS, "do_sample": [True, False], "block_newlines": [True, False],
         "stream": [True, False]}
"""Values of each field's own kind, drawn more often than the rest (which mostly fail the schema's types)."""


def _fuzz_body(rng: random.Random):
    """A valid request with one to three fields replaced by random JSON values (or, now and then, no object)."""
    if rng.random() < 0.05:
        return rng.choice(_NUMBERS + _TEXTS + _OTHER)
    body = {"task": rng.choice(["alpha", "beta"]), "input": "fuzz me", "max_new_tokens": 8}
    names = list(GenerateRequest.model_fields) + ["unknown_field"]
    for name in rng.sample(names, rng.randint(1, 3)):
        own = _KIND.get(name, _NUMBERS)
        body[name] = rng.choice(own if rng.random() < 0.7 else _NUMBERS + _TEXTS + _OTHER)
    return body


def _check_fuzz_answer(body, resp: httpx.Response) -> None:
    assert resp.status_code < 500, f"{body!r}: {resp.status_code} {resp.text}"
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert error["type"] and error["message"], body
    elif resp.headers["content-type"].startswith("text/event-stream"):
        kinds = [k for k, _ in sse_events(resp.text.splitlines())]
        assert kinds and kinds[-1] == "done", f"{body!r}: {resp.text[-300:]}"
    else:
        assert resp.json()["outputs"], body


def test_fuzzed_requests_never_5xx_nor_harm_innocents(live):
    seed = int(os.environ.get("PREFIXTUNE_FUZZ_SEED", "15"))
    rng, deadline, sent = random.Random(seed), time.monotonic() + FUZZ_SECONDS, 0

    async def run():
        nonlocal sent
        async with httpx.AsyncClient(base_url=live.url, timeout=TIMEOUT) as client:
            while time.monotonic() < deadline:
                bodies = [_fuzz_body(rng) for _ in range(8)]
                answers = await _with_innocents(live, client, [_post(b) for b in bodies])
                for body, resp in zip(bodies, answers):
                    _check_fuzz_answer(body, resp)
                sent += len(bodies)

    asyncio.run(run())
    assert sent >= 8
    assert live.app.state.batcher.alive


def test_error_answers_survive_lone_surrogates():
    """An error message may quote the request; JSON lets it hold lone surrogates, which UTF-8 cannot encode."""
    from prefixtune.serve.schema import _error

    body = json.loads(_error(400, "invalid_request", "got 'abc \ud800'").body)
    assert body["error"]["message"] == "got 'abc \\ud800'"
