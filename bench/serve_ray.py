"""`prefixtune serve --ray`: 1 against 2 Ray Serve replicas on this machine, same load through the proxy.

A small random Llama (byte tokenizer, 4 layers of width 128) and 4 random prefixes are saved in a temporary
directory; a local Ray instance (--num-cpus, no dashboard) serves them through `ray_serve.deployment`, the
code `prefixtune serve --ray --replicas N` runs. Each scenario sends the same --requests requests (tasks in
turn, min_new_tokens = max_new_tokens, so every request generates the same tokens) from --concurrency client
threads to 127.0.0.1, after a warm-up, bounded by a request count and per-request timeouts. Scenarios:
1 replica with 1 torch thread, 2 replicas with 1 torch thread each, 1 replica with 2 torch threads.

On 2 busy CPU cores expect no gain from a second replica: both replicas share the cores with each other,
the proxy and whatever else runs. Writes bench/results/serve_ray.{json,md}.

    python bench/serve_ray.py                     # ~2 min on 2 cores
    python bench/serve_ray.py --requests 96 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import byte_tokenizer  # noqa: E402 (the tests' byte tokenizer: no download)

from prefixtune import PrefixConfig, PrefixTuningModel  # noqa: E402
from prefixtune.serve import add_cli_arguments  # noqa: E402
from prefixtune.serve.ray_serve import deployment, http_options, init_ray, ray, serve  # noqa: E402

TASKS = 4


def make_store(root: Path) -> str:
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                                      pad_token_id=256, eos_token_id=257, bos_token_id=258)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    for i in range(TASKS):
        PrefixTuningModel(model, PrefixConfig(prefix_length=8, reparam="table", seed=i)).save_pretrained(
            root / "prefixes" / f"task{i}")
    return str(root / "model")


def parse(model: str, root: Path, port: int, replicas: int, threads: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return parser.parse_args(["--model", model, "--prefix-dir", str(root / "prefixes"), "--ray", "--replicas",
                              str(replicas), "--replica-cpus", str(threads if replicas == 1 else 1), "--port", str(port),
                              "--torch-threads", str(threads), "--max-batch-size", "8"])


def load(url: str, requests: int, concurrency: int, new_tokens: int) -> dict:
    """Send `requests` requests from `concurrency` threads; latencies, tokens/s, status counts."""
    latencies, codes, lock, next_i = [], {}, threading.Lock(), iter(range(requests))

    def worker():
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                with lock:
                    i = next(next_i, None)
                if i is None:
                    return
                start = time.perf_counter()
                r = client.post("/v1/generate", json={"task": f"task{i % TASKS}", "input": f"request {i} text",
                                                       "max_new_tokens": new_tokens, "min_new_tokens": new_tokens})
                with lock:
                    latencies.append(time.perf_counter() - start)
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"wall_s": round(wall, 2), "tokens_per_s": round(codes.get(200, 0) * new_tokens / wall, 1),
            "p50_ms": round(statistics.median(latencies) * 1000), "p95_ms": round(latencies[int(0.95 * (len(latencies) - 1))] * 1000),
            "statuses": {str(k): v for k, v in codes.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    scenarios = [("1 replica, 1 thread", 1, 1), ("2 replicas, 1 thread each", 2, 1), ("1 replica, 2 threads", 1, 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_store(root)
        init_ray(num_cpus=args.num_cpus, log_to_driver=False)
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            serve.start(http_options=http_options(parse(model, root, port, 1, 1)))
            for label, replicas, threads in scenarios:
                start = time.perf_counter()
                serve.run(deployment(parse(model, root, port, replicas, threads)), name="prefixtune", route_prefix="/")
                up = time.perf_counter() - start
                url = f"http://127.0.0.1:{port}"
                load(url, 2 * args.concurrency, args.concurrency, args.new_tokens)  # warm-up, every replica
                row = {"scenario": label, "replicas": replicas, "torch_threads": threads, "startup_s": round(up, 1),
                       **load(url, args.requests, args.concurrency, args.new_tokens)}
                print(row, flush=True)
                rows.append(row)
                serve.delete("prefixtune")
        finally:
            serve.shutdown()
            ray.shutdown()
    result = {"machine": {"cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
                          "python": platform.python_version(), "ray": ray.__version__},
              "load": {"requests": args.requests, "concurrency": args.concurrency, "new_tokens": args.new_tokens,
                       "ray_num_cpus": args.num_cpus}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve_ray.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "serve_ray.md").write_text(markdown(result))


def markdown(result: dict) -> str:
    base = result["rows"][0]["tokens_per_s"] or 1
    lines = ["# `prefixtune serve --ray`: 1 vs 2 replicas", "",
             f"{result['machine']['cpus']} CPU cores (1-min load average {result['machine']['load_avg_1m']} at the "
             f"end), Ray {result['machine']['ray']}; {result['load']['requests']} requests of "
             f"{result['load']['new_tokens']} tokens from {result['load']['concurrency']} clients through the proxy; "
             "a random 4-layer width-128 Llama, 4 prefixes.", "",
             "| scenario | tokens/s | vs 1 replica | p50 ms | p95 ms | statuses | startup s |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['scenario']} | {r['tokens_per_s']} | {r['tokens_per_s'] / base:.2f}x | {r['p50_ms']} | "
                     f"{r['p95_ms']} | {r['statuses']} | {r['startup_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
