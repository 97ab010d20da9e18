"""Load test of `prefixtune serve` on the default model: does mixing tasks in a batch pay off?

Scenarios, all at the same concurrency and with the same inputs and output lengths:
  (a) one task            -- mixed-batching server, every request for task0
  (b) 8 tasks interleaved -- mixed-batching server, request i for task i % 8
  (c) 8 tasks, one task per batch -- the same load on a server started with --one-task-per-batch, which
      batches like an adapter-swapping (PEFT) server must: rows of one task at a time.
Targets: (b) >= 0.9 x (a) and (b) >= 2 x (c) in generated tokens per second.

`--many-tasks`: a bounded task cache against all tasks resident, in the same run. 1,000 random prefixes
(length 10) of a tiny random Llama (SmolLM2's tokenizer, 2 layers of width 64: the cost here is the cache,
not the model) are saved in a temporary directory; one server runs with `--max-tasks 64` (tasks load on
their first request, least recently used evicted), one with all 1,000 loaded at start. Both get the
same request sequences: tasks drawn uniformly, and Zipf-distributed (task rank r with weight 1/r^1.1).
Measured per scenario: tokens/s, p50/p95 latency, the cache hit rate (from /metrics) and the server's
resident memory (RSS) and prefix bytes. Writes bench/results/serve_bench_many_tasks.{json,md}.

Two servers (mixed and one-task) run as child processes on loopback ports, started through the same
`serve.add_cli_arguments` / `serve.cli_main` as `prefixtune serve`; scenarios alternate over rounds so a
change in background load hits all of them alike. Traffic goes to 127.0.0.1 only, and every scenario is
bounded by a request count and a time limit. Prefixes are random (8 tasks, length 10): their texts mean
nothing, and min_new_tokens = max_new_tokens makes every request generate the same number of tokens.

    python bench/serve_bench.py                 # ~4 min on 2 CPU cores; writes bench/results/serve_bench.{json,md}
    python bench/serve_bench.py --many-tasks    # bounded cache vs all resident; serve_bench_many_tasks.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

INPUTS = [
    "name[The Eagle], eatType[coffee shop], food[Japanese], priceRange[less than £20]",
    "name[Alimentum], area[city centre], familyFriendly[no]",
    "name[Zizzi], eatType[pub], customer rating[5 out of 5], near[The Sorrento]",
    "name[Cotto], food[Indian], area[riverside]",
    "name[The Wrestlers], eatType[restaurant], priceRange[high], familyFriendly[yes]",
    "name[Blue Spice], food[Chinese], area[city centre], near[Rainbow Vegetarian Café]",
    "name[Aromi], eatType[coffee shop], customer rating[low]",
    "name[Bibimbap House], food[English], priceRange[moderate], area[riverside], near[Clare Hall]",
]
TASKS = 8


def make_prefixes(directory: Path, model_name: str) -> None:
    """8 random prefixes of length 10 for the model, saved as the server loads them."""
    from prefixtune import PrefixConfig, PrefixTuningModel, load_base_model

    model, _ = load_base_model(model_name)
    for i in range(TASKS):
        PrefixTuningModel(model, PrefixConfig(prefix_length=10, seed=i)).save_pretrained(directory / f"task{i}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(prefix_dir: Path, args, extra: list[str], model: str | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", "--model", model or args.model, "--prefix-dir", str(prefix_dir),
           "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(args.max_batch_size),
           "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning", *extra]
    cmd += ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
    cmd += shlex.split(getattr(args, "server_args", ""))  # soak.py shares start_server without the flag
    return subprocess.Popen(cmd), f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def running(servers: dict[str, tuple[subprocess.Popen, str]]):
    """Wait until every server answers /health; stop them all on the way out."""
    try:
        for proc, url in servers.values():
            wait_healthy(url, proc)
        yield
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)


def measured(key: str, r: int, run: dict) -> dict:
    print(f"round {r + 1} ({key}): {run['tokens'] / run['seconds']:.1f} tokens/s", file=sys.stderr)
    return run


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not healthy after {timeout} s")


async def load(url: str, tasks: list[str], args) -> dict:
    """Closed loop: `concurrency` clients send `requests` requests in total (bounded by `time_limit_s`)."""
    latencies: list[float] = []
    tokens, errors, next_index = 0, 0, 0
    start = time.monotonic()
    deadline = start + args.time_limit_s

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors, next_index
        while next_index < args.requests and time.monotonic() < deadline:
            i, next_index = next_index, next_index + 1
            body = {"task": tasks[i % len(tasks)], "input": INPUTS[i % len(INPUTS)],
                    "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
            sent = time.monotonic()
            resp = await http.post(f"{url}/v1/generate", json=body)
            if resp.status_code != 200:
                errors += 1
                continue
            latencies.append(time.monotonic() - sent)
            tokens += sum(o["output_tokens"] for o in resp.json()["outputs"])

    async with httpx.AsyncClient(timeout=args.time_limit_s) as http:
        await asyncio.gather(*(client(http) for _ in range(args.concurrency)))
    return {"seconds": time.monotonic() - start, "tokens": tokens, "latencies": latencies, "errors": errors}


def summarize(runs: list[dict]) -> dict:
    seconds, tokens = sum(r["seconds"] for r in runs), sum(r["tokens"] for r in runs)
    lat = sorted(x for r in runs for x in r["latencies"])
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"requests": len(lat), "errors": sum(r["errors"] for r in runs), "seconds": round(seconds, 2),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 2), "requests_per_s": round(len(lat) / seconds, 3),
            "p50_s": round(statistics.median(lat), 3) if lat else None, "p95_s": round(pct(0.95), 3),
            "per_round_tokens_per_s": [round(r["tokens"] / r["seconds"], 2) for r in runs]}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads_default": torch.get_num_threads(), "device": "cpu"}


def markdown(result: dict) -> str:
    cfg, m, s, r = result["config"], result["machine"], result["scenarios"], result["ratios"]
    rows = [("(a) one task", "a"), ("(b) 8 tasks interleaved, mixed batches", "b"),
            ("(c) 8 tasks, one task per batch (PEFT-style)", "c")]
    lines = [f"# `prefixtune serve` load test ({cfg['model']})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (CPU). Load average before/after: "
             f"{result['load_before']} / {result['load_after']} (1/5/15 min; other users' jobs may share the machine).", "",
             f"Each scenario: {cfg['requests']} requests x {cfg['rounds']} rounds, {cfg['concurrency']} concurrent clients, "
             f"greedy, exactly {cfg['new_tokens']} new tokens each, max batch {cfg['max_batch_size']}, "
             f"8 random prefixes of length 10.", "",
             "| scenario | tokens/s | requests/s | p50 latency (s) | p95 latency (s) | errors | tokens/s per round |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for label, key in rows:
        x = s[key]
        lines.append(f"| {label} | {x['tokens_per_s']} | {x['requests_per_s']} | {x['p50_s']} | {x['p95_s']} | "
                     f"{x['errors']} | {', '.join(map(str, x['per_round_tokens_per_s']))} |")
    lines += ["", f"- (b) / (a) = {r['b_over_a']} (target >= 0.9): {'met' if r['b_over_a'] >= 0.9 else 'MISSED'}",
              f"- (b) / (c) = {r['b_over_c']} (target >= 2): {'met' if r['b_over_c'] >= 2 else 'MISSED'}",
              "- per round (same background load within a round): "
              + "; ".join(f"b/a {x['b_over_a']}, b/c {x['b_over_c']}" for x in r["per_round"]), "",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


# --- the many-tasks scenario ---------------------------------------------------------------------------
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512)
"""The tiny random model of --many-tasks: big enough to batch, small enough that task handling dominates."""
ZIPF_S = 1.1
DISTRIBUTIONS = ("uniform", "zipf")
CACHE_SAMPLES = ("prefixtune_task_cache_hits_total", "prefixtune_task_cache_misses_total",
                 "prefixtune_task_cache_evictions_total", "prefixtune_tasks", "prefixtune_task_bytes")


def make_tiny_model(directory: Path, tokenizer_of: str) -> None:
    """A random Llama with `tokenizer_of`'s tokenizer, saved as a local model directory (what --model takes)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from prefixtune.base_model import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(tokenizer_of), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **TINY_LLAMA)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def make_many_prefixes(directory: Path, model_dir: Path, count: int) -> None:
    from prefixtune import PrefixConfig, PrefixTuningModel, load_base_model

    model, _ = load_base_model(str(model_dir))
    for i in range(count):
        PrefixTuningModel(model, PrefixConfig(prefix_length=10, reparam="table", seed=i)).save_pretrained(
            directory / f"task{i:04d}")


def traffic(distribution: str, tasks: int, count: int, seed: int) -> list[str]:
    """The task of each request: uniform, or Zipf over a shuffled ranking (popularity unrelated to names)."""
    rng = random.Random(seed)
    names = [f"task{i:04d}" for i in range(tasks)]
    if distribution == "uniform":
        return [rng.choice(names) for _ in range(count)]
    rng.shuffle(names)
    return rng.choices(names, [1 / (rank + 1) ** ZIPF_S for rank in range(tasks)], k=count)


def cache_state(url: str, proc: subprocess.Popen) -> dict:
    """The server's cache counters and resident set from /metrics, and its resident memory."""
    import psutil
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=30).text
    state = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in CACHE_SAMPLES}
    return {**state, "rss_bytes": psutil.Process(proc.pid).memory_info().rss}


def many_tasks(args, argv: list[str]) -> int:
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict]] = {}
    startup: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, prefix_dir = Path(tmp) / "tiny-llama", Path(tmp) / "prefixes"
        make_tiny_model(model_dir, args.model)
        make_many_prefixes(prefix_dir, model_dir, args.tasks)
        servers = {"bounded": start_server(prefix_dir, args, ["--max-tasks", str(args.max_tasks)], str(model_dir)),
                   "all": start_server(prefix_dir, args, [], str(model_dir))}
        with running(servers):
            for name, (proc, url) in servers.items():
                startup[name] = cache_state(url, proc)
                warm = argparse.Namespace(**{**vars(args), "requests": args.concurrency})
                asyncio.run(load(url, traffic("uniform", args.tasks, args.concurrency, seed=-1), warm))  # not measured
            for r in range(args.rounds):
                for dist in DISTRIBUTIONS:
                    tasks = traffic(dist, args.tasks, args.requests, seed=r)  # the same sequence for both servers
                    for name, (proc, url) in servers.items():
                        before = cache_state(url, proc)
                        run = measured(f"{dist}/{name}", r, asyncio.run(load(url, tasks, args)))
                        runs.setdefault(f"{dist}/{name}", []).append({**run, "before": before,
                                                                      "after": cache_state(url, proc)})
    scenarios = {key: {**summarize(rs), **cache_summary(rs)} for key, rs in runs.items()}
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "model": {**TINY_LLAMA, "tokenizer_of":
              args.model, "prefix_length": 10, "zipf_s": ZIPF_S}, "machine": machine(), "load_before": load_before,
              "load_after": [round(x, 2) for x in os.getloadavg()], "command": " ".join(["python bench/serve_bench.py",
              *argv]), "startup": startup, "scenarios": scenarios,
              "ratios": {f"{d}_bounded_over_all": round(scenarios[f"{d}/bounded"]["tokens_per_s"]
                                                        / scenarios[f"{d}/all"]["tokens_per_s"], 3) for d in DISTRIBUTIONS}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_bench_many_tasks.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serve_bench_many_tasks.md").write_text(many_tasks_markdown(result))
    print(many_tasks_markdown(result))
    return 0


def cache_summary(runs: list[dict]) -> dict:
    delta = lambda key: sum(r["after"].get(key, 0) - r["before"].get(key, 0) for r in runs)  # noqa: E731
    hits, misses = delta(CACHE_SAMPLES[0]), delta(CACHE_SAMPLES[1])
    last = runs[-1]["after"]
    return {"hit_rate": round(hits / (hits + misses), 3) if hits + misses else None, "evictions": int(delta(CACHE_SAMPLES[2])),
            "resident_tasks": int(last.get("prefixtune_tasks", 0)),
            "prefix_mib": round(last.get("prefixtune_task_bytes", 0) / 2**20, 2),
            "rss_mib": round(max(r["after"]["rss_bytes"] for r in runs) / 2**20, 1)}


def many_tasks_markdown(result: dict) -> str:
    cfg, m, s = result["config"], result["machine"], result["scenarios"]
    lines = [f"# `prefixtune serve`: {cfg['tasks']} tasks, --max-tasks {cfg['max_tasks']} vs all resident", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} (CPU). Load average before/after: "
             f"{result['load_before']} / {result['load_after']} (1/5/15 min; other users' jobs may share the machine).", "",
             f"Model: a random Llama (2 layers, width 64) with {cfg['model']}'s tokenizer; {cfg['tasks']} random prefixes "
             f"of length 10. Each scenario: {cfg['requests']} requests x {cfg['rounds']} rounds, {cfg['concurrency']} "
             f"concurrent clients, greedy, exactly {cfg['new_tokens']} new tokens each, max batch {cfg['max_batch_size']}; "
             f"both servers get the same task sequences (uniform; Zipf with s = {ZIPF_S}), alternating.", "",
             "| traffic | server | tokens/s | p50 latency (s) | p95 latency (s) | cache hit rate | evictions | "
             "resident tasks | prefix MiB | server RSS MiB | errors | tokens/s per round |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, x in s.items():
        dist, server = key.split("/")
        label = f"--max-tasks {cfg['max_tasks']}" if server == "bounded" else f"all {cfg['tasks']} resident"
        lines.append(f"| {dist} | {label} | {x['tokens_per_s']} | {x['p50_s']} | {x['p95_s']} | {x['hit_rate']} | "
                     f"{x['evictions']} | {x['resident_tasks']} | {x['prefix_mib']} | {x['rss_mib']} | {x['errors']} | "
                     f"{', '.join(map(str, x['per_round_tokens_per_s']))} |")
    start = result["startup"]
    lines += ["", "- tokens/s, bounded / all resident: " + ", ".join(f"{k.split('_')[0]} {v}" for k, v in
                                                                      result["ratios"].items()),
              f"- server RSS after start: bounded {start['bounded']['rss_bytes'] / 2**20:.1f} MiB "
              f"({int(start['bounded'].get('prefixtune_tasks', 0))} tasks), all resident "
              f"{start['all']['rss_bytes'] / 2**20:.1f} MiB ({int(start['all'].get('prefixtune_tasks', 0))} tasks)", "",
              f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:  # child: run one server exactly as `prefixtune serve` would
        from prefixtune import serve

        parser = argparse.ArgumentParser(prog="serve_bench.py --serve")
        serve.add_cli_arguments(parser)
        return serve.cli_main(parser.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=None, help="requests per scenario and round (default 64; "
                   "400 with --many-tasks)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--server-args", default="", help="more `prefixtune serve` flags for every server, e.g. "
                   "'--device cuda' (one string)")
    p.add_argument("--time-limit-s", type=float, default=150.0, help="per scenario and round")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--many-tasks", action="store_true", help="run the many-tasks scenario instead (tiny model)")
    p.add_argument("--tasks", type=int, default=1000, help="--many-tasks: saved prefixes")
    p.add_argument("--max-tasks", type=int, default=64, help="--many-tasks: the bounded server's --max-tasks")
    args = p.parse_args(argv)
    args.requests = args.requests or (400 if args.many_tasks else 64)
    if args.many_tasks:
        return many_tasks(args, argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    with tempfile.TemporaryDirectory() as tmp:
        make_prefixes(Path(tmp), args.model)
        servers = {"mixed": start_server(Path(tmp), args, []),
                   "one_task": start_server(Path(tmp), args, ["--one-task-per-batch"])}
        with running(servers):
            mixed, one_task = servers["mixed"][1], servers["one_task"][1]
            every = [f"task{i}" for i in range(TASKS)]
            plan = {"a": (mixed, ["task0"]), "b": (mixed, every), "c": (one_task, every)}
            warm = argparse.Namespace(**{**vars(args), "requests": args.concurrency})
            for url, tasks in plan.values():  # warm-up, not measured
                asyncio.run(load(url, tasks, warm))
            for r in range(args.rounds):
                for key, (url, tasks) in plan.items():
                    runs[key].append(measured(key, r, asyncio.run(load(url, tasks, args))))
    scenarios = {k: summarize(v) for k, v in runs.items()}
    tps = {k: v["tokens_per_s"] for k, v in scenarios.items()}
    result = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(),
              "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
              "command": " ".join(["python bench/serve_bench.py", *argv]), "scenarios": scenarios,
              "ratios": {"b_over_a": round(tps["b"] / tps["a"], 3), "b_over_c": round(tps["b"] / tps["c"], 3),
                         "per_round": [{k: round(b["tokens"] / b["seconds"] / (x["tokens"] / x["seconds"]), 3)
                                        for k, x in (("b_over_a", a), ("b_over_c", c))}
                                       for a, b, c in zip(runs["a"], runs["b"], runs["c"])]}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serve_bench.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
