"""Soak test of `prefixtune serve` (issue 15): one bad request never harms another, memory stays flat.

N mixed requests -- greedy, seeded sampling, beam search, streams (greedy and seeded sampling), some with
lists of inputs -- with bad requests interleaved (5% by default: the issue's attacks, out-of-range and
non-finite numbers, lone surrogates, a 960 KB prompt, unknown tasks, broken JSON, a body shorter than its
Content-Length), sent by 16 concurrent clients to one server on 127.0.0.1. The server is a child process
started like `prefixtune serve` (bench/serve_bench.py's `--serve`), on a tiny random Llama with SmolLM2's
tokenizer and 4 random prefixes: the load is the server's, not a model's.

Reported: 5xx answers (must be 0), innocent requests harmed (any answer but a complete 200: must be 0),
bad requests answered other than their expected 4xx, the server's RSS before and after, /metrics
against what was sent (requests by status, generated tokens; read from the exposition by name suffix, so
renamed prefixes still match), and a sample of innocent responses sent again one at a time after the
soak, which must give the same texts.

    python bench/soak.py                    # 2,000 requests; writes bench/results/soak.{json,md}
    python bench/soak.py --requests 400     # a short run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_bench import INPUTS, machine, make_many_prefixes, make_tiny_model, running, start_server  # noqa: E402

TASKS = [f"task{i:04d}" for i in range(4)]
RSS_POINTS = 4
"""The soak runs in this many parts, with the server's RSS read after each."""
BAD = [  # (name, body: dict, raw bytes, or "short-body"), the 4xx statuses it may get
    ("seed-2**64", {"do_sample": True, "seed": 2**64}, {400}),
    ("temperature-1e-300", {"do_sample": True, "temperature": 1e-300}, {400}),
    ("temperature-nan", {"do_sample": True, "temperature": float("nan")}, {400}),
    ("top_p-inf", {"do_sample": True, "top_p": float("inf")}, {400}),
    ("num_beams-10**9", {"num_beams": 10**9}, {400}),
    ("beams-x-inputs", {"num_beams": 8, "input": ["a"] * 9}, {400}),
    ("lone-surrogate", {"input": "abc \ud800"}, {400}),
    ("huge-prompt", {"input": "y" * 960_000}, {400}),
    ("unknown-task", {"task": "no-such-task"}, {404}),
    ("bad-task-name", {"task": "../etc"}, {400}),
    ("wrong-type", {"max_new_tokens": "many"}, {422}),
    ("broken-json", b'{"task": "task0000", "input": ', {400}),
    ("short-body", "short-body", {408}),
]


# --- the plan --------------------------------------------------------------------------------------
def plan(count: int, bad_fraction: float, seed: int) -> list[dict]:
    """The requests in sending order: kind, body (or raw bytes), and for bad ones the statuses expected."""
    rng, items = random.Random(seed), []
    for i in range(count):
        if rng.random() < bad_fraction:
            name, body, expect = rng.choice(BAD)
            if isinstance(body, dict):
                body = {"task": rng.choice(TASKS), "input": rng.choice(INPUTS), **body}
            items.append({"kind": "bad", "name": name, "body": body, "expect": sorted(expect)})
            continue
        kind = rng.choices(["greedy", "sampled", "beams", "stream"], [0.35, 0.2, 0.15, 0.3])[0]
        inputs = rng.sample(INPUTS, 2) if rng.random() < 0.15 and kind != "stream" else rng.choice(INPUTS)
        body = {"task": rng.choice(TASKS), "input": inputs, "max_new_tokens": rng.randint(4, 24)}
        if kind == "sampled" or (kind == "stream" and rng.random() < 0.5):
            body.update(do_sample=True, seed=rng.randrange(2**31), temperature=rng.choice([0.7, 1.0, 1.3]),
                        top_p=rng.choice([0.9, 1.0]))
        if kind == "beams":
            body.update(num_beams=rng.choice([2, 3, 4]), max_new_tokens=rng.randint(4, 12))
        if kind == "stream":
            body["stream"] = True
        items.append({"kind": kind, "body": body})
    return items


# --- sending -----------------------------------------------------------------------------------------
async def send(client: httpx.AsyncClient, url: str, item: dict) -> dict:
    """One request: its status, and for a 200 the output texts and generated tokens (streams: the done event)."""
    body = item["body"]
    if body == "short-body":
        return {"status": await short_body(url)}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    out = {"status": resp.status_code}
    if resp.status_code != 200:
        return out
    if isinstance(body, dict) and body.get("stream"):
        events = [line[len("data: "):] for line in resp.text.splitlines() if line.startswith("data: ")]
        kinds = [line[len("event: "):] for line in resp.text.splitlines() if line.startswith("event: ")]
        if not kinds or kinds[-1] != "done":
            return {**out, "incomplete": kinds[-1:] or ["nothing"]}
        answer = json.loads(events[-1])
    else:
        answer = resp.json()
    return {**out, "texts": [o["text"] for o in answer["outputs"]],
            "tokens": sum(o["output_tokens"] for o in answer["outputs"])}


async def short_body(url: str) -> int:
    """A body shorter than its Content-Length: the server must answer (408) instead of waiting forever."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /v1/generate HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 64\r\n\r\n{\"task\"")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 60)
        return int(line.split()[1]) if line else 0
    finally:
        writer.close()


async def soak(url: str, items: list[dict], concurrency: int, time_limit_s: float) -> list[dict]:
    """Closed loop: `concurrency` clients take the next planned request until all are sent (or time is up)."""
    results: list[dict | None] = [None] * len(items)
    next_index, deadline = 0, time.monotonic() + time_limit_s

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(items) and time.monotonic() < deadline:
            i, next_index = next_index, next_index + 1
            results[i] = await send(client, url, items[i])

    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return [{**item, **r} for item, r in zip(items, results) if r is not None]


# --- checks ------------------------------------------------------------------------------------------
def server_counts(url: str) -> dict:
    """/v1/generate requests by status and generated tokens, from the exposition (names matched by suffix)."""
    from prometheus_client.parser import text_string_to_metric_families

    statuses, tokens = Counter(), 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.labels.get("route", "/v1/generate") != "/v1/generate":
                continue
            if s.name.endswith("requests_total") and "status" in s.labels:
                statuses[s.labels["status"]] += s.value
            elif s.name.endswith("output_tokens_total"):
                tokens += s.value
    return {"statuses": {k: int(v) for k, v in statuses.items()}, "output_tokens": int(tokens)}


def metrics_check(before: dict, after: dict, done: list[dict]) -> dict:
    sent = Counter(str(r["status"]) for r in done)
    seen = {k: after["statuses"].get(k, 0) - before["statuses"].get(k, 0) for k in set(after["statuses"]) | set(sent)}
    seen = {k: v for k, v in seen.items() if v}
    tokens_sent = sum(r.get("tokens", 0) for r in done)
    tokens_seen = after["output_tokens"] - before["output_tokens"]
    return {"sent_by_status": dict(sorted(sent.items())), "server_by_status": dict(sorted(seen.items())),
            "tokens_received": tokens_sent, "tokens_counted": tokens_seen,
            "consistent": dict(sent) == seen and tokens_sent == tokens_seen}


def alone_check(url: str, done: list[dict], sample: int, seed: int) -> dict:
    """Send a sample of innocent requests again, one at a time, and compare the texts."""
    innocents = [r for r in done if r["kind"] != "bad" and r["status"] == 200]
    picked = random.Random(seed).sample(innocents, min(sample, len(innocents)))
    differ = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for r in picked:
            body = {**r["body"], "stream": False}
            texts = [o["text"] for o in client.post("/v1/generate", json=body).json()["outputs"]]
            if texts != r["texts"]:
                differ.append({"body": r["body"], "in_soak": r["texts"], "alone": texts})
    return {"sampled": len(picked), "by_kind": dict(Counter(r["kind"] for r in picked)), "differ": differ}


def summarize(done: list[dict], planned: int, seconds: float, rss: dict, metrics: dict, alone: dict) -> dict:
    bad = [r for r in done if r["kind"] == "bad"]
    harmed = [r for r in done if r["kind"] != "bad" and (r["status"] != 200 or "incomplete" in r)]
    misanswered = [r for r in bad if r["status"] not in r["expect"]]
    return {"planned": planned, "sent": len(done), "seconds": round(seconds, 1),
            "by_kind": dict(Counter(r["kind"] for r in done)), "by_status": dict(Counter(str(r["status"]) for r in done)),
            "bad_by_name": dict(Counter(f"{r['name']} -> {r['status']}" for r in bad)),
            "server_errors_5xx": sum(r["status"] >= 500 for r in done), "innocents_harmed": len(harmed),
            "harmed_examples": [{"body": str(r["body"])[:200], "status": r["status"]} for r in harmed[:5]],
            "bad_misanswered": [{"name": r["name"], "status": r["status"]} for r in misanswered[:10]],
            "rss_mib": rss, "metrics": metrics, "alone": alone}


def markdown(result: dict) -> str:
    s, cfg, m = result["summary"], result["config"], result["machine"]
    mt, al = s["metrics"], s["alone"]
    ok = lambda cond: "ok" if cond else "FAILED"  # noqa: E731
    lines = [
        "# `prefixtune serve` soak: bad requests interleaved with good ones", "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (CPU). {s['sent']} of {s['planned']} planned "
        f"requests in {s['seconds']} s, {cfg['concurrency']} concurrent clients, about {cfg['bad_fraction']:.0%} bad; "
        f"tiny random Llama (SmolLM2's tokenizer), {len(TASKS)} random prefixes, max batch {cfg['max_batch_size']}.",
        "", f"Requests by kind: {s['by_kind']}; answers by status: {s['by_status']}.", "",
        "| check | result | |", "|---|---|---|",
        f"| 5xx answers | {s['server_errors_5xx']} | {ok(s['server_errors_5xx'] == 0)} |",
        f"| innocent requests harmed (not a complete 200) | {s['innocents_harmed']} | {ok(s['innocents_harmed'] == 0)} |",
        f"| bad requests answered other than expected | {len(s['bad_misanswered'])} | {ok(not s['bad_misanswered'])} |",
        f"| server RSS before / after (MiB) | {s['rss_mib']['before']} / {s['rss_mib']['after']} | "
        f"growth {round(s['rss_mib']['after'] - s['rss_mib']['before'], 1)} MiB; after each quarter "
        f"{s['rss_mib']['after_each_quarter']} |",
        f"| /metrics requests by status | sent {mt['sent_by_status']}, counted {mt['server_by_status']} | "
        f"{ok(mt['sent_by_status'] == mt['server_by_status'])} |",
        f"| /metrics generated tokens | received {mt['tokens_received']}, counted {mt['tokens_counted']} | "
        f"{ok(mt['tokens_received'] == mt['tokens_counted'])} |",
        f"| sampled responses equal to the same request alone | {al['sampled'] - len(al['differ'])} of {al['sampled']} "
        f"{al['by_kind']} | {ok(not al['differ'])} |",
        "", "Bad requests (name -> status): " + ", ".join(f"{k}: {v}" for k, v in sorted(s["bad_by_name"].items())),
        "", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--bad-fraction", type=float, default=0.05)
    p.add_argument("--sample", type=int, default=100, help="innocent responses checked against a single run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer-of", default="smollm2-135m", help="model whose tokenizer the tiny model uses")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--time-limit-s", type=float, default=1800.0)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    import psutil

    items = plan(args.requests, args.bad_fraction, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prefix_dir = Path(tmp) / "tiny-llama", Path(tmp) / "prefixes"
        make_tiny_model(model_dir, args.tokenizer_of)
        make_many_prefixes(prefix_dir, model_dir, len(TASKS))
        args.model = str(model_dir)  # what start_server passes as --model
        proc, url = start_server(prefix_dir, args, ["--body-timeout-s", "2", "--request-timeout-s", "120"])
        with running({"soak": (proc, url)}):
            asyncio.run(soak(url, plan(32, 0.0, seed=-1), args.concurrency, 300))  # warm-up, not counted
            rss = lambda: round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)  # noqa: E731
            rss_points, before = [rss()], server_counts(url)
            start, done, part = time.monotonic(), [], -(-len(items) // RSS_POINTS)
            for i in range(0, len(items), part):  # in quarters, to see whether memory grows or settles
                left = args.time_limit_s - (time.monotonic() - start)
                done += asyncio.run(soak(url, items[i : i + part], args.concurrency, left))
                rss_points.append(rss())
            seconds = time.monotonic() - start
            after = server_counts(url)
            alone = alone_check(url, done, args.sample, args.seed)
    summary = summarize(done, len(items), seconds, {"before": rss_points[0], "after": rss_points[-1],
                                                    "after_each_quarter": rss_points[1:]},
                        metrics_check(before, after, done), alone)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "model")}
    result = {"config": config, "machine": machine(), "command": " ".join(["python bench/soak.py", *argv]),
              "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "soak.md").write_text(markdown(result))
    print(markdown(result))
    passed = (summary["server_errors_5xx"] == 0 and summary["innocents_harmed"] == 0 and not summary["bad_misanswered"]
              and summary["metrics"]["consistent"] and not alone["differ"])
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
