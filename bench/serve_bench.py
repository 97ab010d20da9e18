"""Load test of `prefixtune serve` on the default model: does mixing tasks in a batch pay off?

Scenarios, all at the same concurrency and with the same inputs and output lengths:
  (a) one task            -- mixed-batching server, every request for task0
  (b) 8 tasks interleaved -- mixed-batching server, request i for task i % 8
  (c) 8 tasks, one task per batch -- the same load on a server started with --one-task-per-batch, which
      batches like an adapter-swapping (PEFT) server must: rows of one task at a time.
Targets: (b) >= 0.9 x (a) and (b) >= 2 x (c) in generated tokens per second.

Two servers (mixed and one-task) run as child processes on loopback ports, started through the same
`serve.add_cli_arguments` / `serve.cli_main` as `prefixtune serve`; scenarios alternate over rounds so a
change in background load hits all of them alike. Traffic goes to 127.0.0.1 only, and every scenario is
bounded by a request count and a time limit. Prefixes are random (8 tasks, length 10): their texts mean
nothing, and min_new_tokens = max_new_tokens makes every request generate the same number of tokens.

    python bench/serve_bench.py                 # ~4 min on 2 CPU cores; writes bench/results/serve_bench.{json,md}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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


def start_server(prefix_dir: Path, args, one_task: bool) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, __file__, "--serve", "--model", args.model, "--prefix-dir", str(prefix_dir),
           "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", str(args.max_batch_size),
           "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"]
    cmd += ["--one-task-per-batch"] if one_task else []
    cmd += ["--torch-threads", str(args.torch_threads)] if args.torch_threads else []
    return subprocess.Popen(cmd), f"http://127.0.0.1:{port}"


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


def main(argv: list[str]) -> int:
    if argv[:1] == ["--serve"]:  # child: run one server exactly as `prefixtune serve` would
        from prefixtune import serve

        parser = argparse.ArgumentParser(prog="serve_bench.py --serve")
        serve.add_cli_arguments(parser)
        return serve.cli_main(parser.parse_args(argv[1:]))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--requests", type=int, default=64, help="requests per scenario and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=20)
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--torch-threads", type=int, default=None)
    p.add_argument("--time-limit-s", type=float, default=150.0, help="per scenario and round")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict]] = {"a": [], "b": [], "c": []}
    with tempfile.TemporaryDirectory() as tmp:
        make_prefixes(Path(tmp), args.model)
        servers = {"mixed": start_server(Path(tmp), args, False), "one_task": start_server(Path(tmp), args, True)}
        try:
            for proc, url in servers.values():
                wait_healthy(url, proc)
            mixed, one_task = servers["mixed"][1], servers["one_task"][1]
            every = [f"task{i}" for i in range(TASKS)]
            plan = {"a": (mixed, ["task0"]), "b": (mixed, every), "c": (one_task, every)}
            warm = argparse.Namespace(**{**vars(args), "requests": args.concurrency})
            for url, tasks in plan.values():  # warm-up, not measured
                asyncio.run(load(url, tasks, warm))
            for r in range(args.rounds):
                for key, (url, tasks) in plan.items():
                    runs[key].append(asyncio.run(load(url, tasks, args)))
                    print(f"round {r + 1} ({key}): {runs[key][-1]['tokens'] / runs[key][-1]['seconds']:.1f} tokens/s",
                          file=sys.stderr)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)
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
