"""The decoding engine under a server's load, without HTTP: where a step's time goes, and what precision does.

    python bench/engine_load.py                  # fp32, bf16 autocast, bf16-stored weights: alternating, 2 rounds
    python bench/engine_load.py --profile        # one fp32 round under cProfile: the top functions by time

The load is the serve bench's scenario (b): 8 random prefixes of length 10 on the default model, E2E test MRs
as inputs, requests for task i % 8, exactly 20 greedy tokens each, at most 16 lanes in flight; whenever
requests end, as many new ones join before the next step (what the server's scheduler does between steps).
Three ways to run the frozen base, in turns within each round: fp32 weights; fp32 weights under bf16
autocast (what `--bf16 on` does: every op re-casts its weights); weights stored in bf16 once (`--dtype
bfloat16`), under autocast so the fp32 prefixes meet them in bf16. Prints tokens/s per round and writes
bench/results/engine_load.{json,md} (medians, ratios to fp32, the machine): the measurement behind `--dtype auto`
keeping float32 weights on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from prefixtune import GenerateConfig, inject
from prefixtune.decoding import Engine, Request, decoding_kwargs
from prefixtune.base_model import load_base_model
from prefixtune.prefix import PrefixKV
from prefixtune.tasks import load_groups

LANES, NEW_TOKENS, TASKS = 16, 20, 8
RESULTS = Path(__file__).resolve().parent / "results"


def setup():
    torch.manual_seed(0)
    base, tok = load_base_model("smollm2-135m")
    slots, shapes = inject.prepare(base)
    prefixes = [PrefixKV({s: (torch.randn(shapes[s][0], 10, shapes[s][1]), torch.randn(shapes[s][0], 10, shapes[s][1]))
                          for s in slots}) for _ in range(TASKS)]
    prompts = [tok(" " + g.source + " " + tok.eos_token)["input_ids"] for g in load_groups("e2e", "test")[:200]]
    kwargs = decoding_kwargs(tok, GenerateConfig(num_beams=1, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS))
    return base, prefixes, prompts, kwargs


def run(engine: Engine, prefixes, prompts, kwargs, n: int) -> tuple[float, int]:
    """Seconds and steps to decode n requests, keeping up to LANES in flight."""
    done, joined, steps, start = [0], 0, 0, time.perf_counter()
    while done[0] < n:
        room = min(LANES - engine.lanes, n - joined)
        if room > 0:
            engine.add([Request(prompts[i % len(prompts)], prefixes[i % TASKS], kwargs,
                                on_done=lambda r: done.__setitem__(0, done[0] + 1)) for i in range(joined, joined + room)])
            joined += room
        engine.step()
        steps += 1
    return time.perf_counter() - start, steps


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def measure(base, prefixes, prompts, kwargs, rounds: int, requests: int) -> dict[str, list[float]]:
    """tokens/s per round of each way to run the base, the ways alternating within a round."""
    stored = copy.deepcopy(base).to(torch.bfloat16)
    modes = {"fp32": (Engine(base), contextlib.nullcontext), "bf16 autocast": (Engine(base), _autocast),
             "bf16 weights": (Engine(stored), _autocast)}
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for r in range(rounds):
        for name, (engine, context) in modes.items():
            with torch.inference_mode(), context():
                seconds, steps = run(engine, prefixes, prompts, kwargs, requests)
            rates[name].append(round(requests * NEW_TOKENS / seconds, 2))
            print(f"round {r + 1}, {name}: {rates[name][-1]} tokens/s ({steps} steps)", flush=True)
    return rates


def write(rates: dict[str, list[float]], args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_bench import machine

    medians = {name: statistics.median(values) for name, values in rates.items()}
    ratios = {name: round(m / medians["fp32"], 3) for name, m in medians.items()}
    report = {"tokens_per_s": rates, "median": medians, "ratio_to_fp32": ratios, "machine": machine(),
              "lanes": LANES, "new_tokens": NEW_TOKENS, "tasks": TASKS,
              "command": f"python bench/engine_load.py --rounds {args.rounds} --requests {args.requests}"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine_load.json").write_text(json.dumps(report, indent=1) + "\n")
    rows = "\n".join(f"| {name} | {' / '.join(map(str, rates[name]))} | {medians[name]:.1f} | {ratios[name]:.2f}x |"
                     for name in rates)
    m = report["machine"]
    (RESULTS / "engine_load.md").write_text(
        "# Decoding engine under the serve load: how to run the frozen base\n\n"
        f"{LANES} lanes, {TASKS} prefixes of length 10, {NEW_TOKENS} greedy tokens per request, SmolLM2-135M, "
        "the three ways alternating within each round.\n\n| base | tokens/s per round | median | vs fp32 |\n"
        f"|---|---:|---:|---:|\n{rows}\n\nMachine: {m['cpu']}, {m['cores']} cores. Command: `{report['command']}`\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    base, prefixes, prompts, kwargs = setup()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        seconds, steps = run(Engine(base), prefixes, prompts, kwargs, args.requests)
        profiler.disable()
        print(f"fp32: {args.requests * NEW_TOKENS / seconds:.1f} tokens/s ({steps} steps, {seconds:.1f} s)")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return 0
    write(measure(base, prefixes, prompts, kwargs, args.rounds, args.requests), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
