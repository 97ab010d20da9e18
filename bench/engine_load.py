"""The decoding engine under a server's load, without HTTP: where a step's time goes, and what precision does.

    python bench/engine_load.py                  # fp32 vs bf16 autocast, alternating, 2 rounds of 48 requests
    python bench/engine_load.py --profile        # one fp32 round under cProfile: the top functions by time

The load is the serve bench's scenario (b): 8 random prefixes of length 10 on the default model, E2E test MRs
as inputs, requests for task i % 8, exactly 20 greedy tokens each, at most 16 lanes in flight; whenever
requests end, as many new ones join before the next step (what the server's scheduler does between steps).
Prints tokens/s per round; nothing is written (the serve benches in bench/results/ are the record).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import pstats
import time

import torch

from prefixtune import GenerateConfig, inject
from prefixtune.decoding import Engine, Request, decoding_kwargs
from prefixtune.base_model import load_base_model
from prefixtune.prefix import PrefixKV
from prefixtune.tasks import load_groups

LANES, NEW_TOKENS, TASKS = 16, 20, 8


def setup():
    torch.manual_seed(0)
    base, tok = load_base_model("smollm2-135m")
    slots, shapes = inject.prepare(base)
    prefixes = [PrefixKV({s: (torch.randn(shapes[s][0], 10, shapes[s][1]), torch.randn(shapes[s][0], 10, shapes[s][1]))
                          for s in slots}) for _ in range(TASKS)]
    prompts = [tok(" " + g.source + " " + tok.eos_token)["input_ids"] for g in load_groups("e2e", "test")[:200]]
    kwargs = decoding_kwargs(tok, GenerateConfig(num_beams=1, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS))
    return Engine(base), prefixes, prompts, kwargs


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    engine, prefixes, prompts, kwargs = setup()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        seconds, steps = run(engine, prefixes, prompts, kwargs, args.requests)
        profiler.disable()
        print(f"fp32: {args.requests * NEW_TOKENS / seconds:.1f} tokens/s ({steps} steps, {seconds:.1f} s)")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return 0
    modes = {"fp32": contextlib.nullcontext, "bf16 autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    for r in range(args.rounds):
        for name, context in modes.items():
            with context():
                seconds, steps = run(engine, prefixes, prompts, kwargs, args.requests)
            print(f"round {r + 1}, {name}: {args.requests * NEW_TOKENS / seconds:.1f} tokens/s ({steps} steps)",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
