"""Beam-5 decoding speed: prefixtune's path against transformers' generate, same batch, same run.

    python bench/decode_speed.py                 # needs the main job's prefix (runs/e2e-300)
    PREFIX=runs/other SOURCES=64 REPEATS=3 python bench/decode_speed.py

Both paths decode the same E2E test MRs (sorted by length, in batches of 32, as `evaluate` does) with the
same trained prefix, in turns, REPEATS times each; the ratio of the fastest times is reported because
these 2-core machines are noisy. "transformers" is `generate_ids(prefill_once=False)`: transformers'
own beam search with the prefix concatenated at every step. "prefixtune" is the default path: prompt run
once per source, prefix held in the cache, finished sources dropped (generate.prompt_cache, beam.py).
Row-steps (rows through the model's forward, summed over calls; transformers' prompt pass counts as one
call) are counted too; outputs must be identical.
Writes bench/results/decode_speed.json and .md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from e2e_main import machine  # noqa: E402

from prefixtune.config import GenerateConfig  # noqa: E402
from prefixtune.decoding import decoding_kwargs, encode_sources, generate_ids  # noqa: E402
from prefixtune.base_model import load_base_model  # noqa: E402
from prefixtune.multi import MultiPrefixModel  # noqa: E402
from prefixtune.tasks import load_groups  # noqa: E402


def decode_all(multi, batches, kwargs, prefill_once: bool) -> tuple[float, list]:
    """Seconds to decode every batch, and the generated ids."""
    task = multi.tasks()["e2e"]
    outputs = []
    start = time.perf_counter()
    with torch.no_grad():
        for ids, mask in batches:
            out = generate_ids(multi.base, [task.prefix] * ids.shape[0], ids, mask, prefill_once=prefill_once,
                               **kwargs)
            outputs.append(out[:, ids.shape[1]:].tolist())
    return time.perf_counter() - start, outputs


def main() -> int:
    prefix = Path(os.environ.get("PREFIX", ROOT / "runs" / "e2e-300"))
    n_sources, repeats = int(os.environ.get("SOURCES", "64")), int(os.environ.get("REPEATS", "3"))
    if not (prefix / "prefix.safetensors").exists():
        print(f"no trained prefix in {prefix}: run `bash scripts/main.sh` first, or set PREFIX=<run dir>",
              file=sys.stderr)
        return 2
    base, tokenizer = load_base_model("smollm2-135m")
    multi = MultiPrefixModel(base, tokenizer)
    multi.add("e2e", prefix)
    fmt = multi.tasks()["e2e"].text_format
    if tokenizer.pad_token_id is None:  # before encode_sources pads the batches
        tokenizer.pad_token = tokenizer.eos_token
    sources = sorted((g.source for g in load_groups("e2e", "test")[:n_sources]),
                     key=lambda s: len(tokenizer(s).input_ids))
    batches = [encode_sources(tokenizer, base, sources[i : i + 32], [fmt] * len(sources[i : i + 32]))
               for i in range(0, len(sources), 32)]
    config = GenerateConfig(num_beams=5, batch_size=32, bf16="off")
    kwargs = decoding_kwargs(tokenizer, config)
    rows: list[int] = []
    base.register_forward_hook(lambda m, a, kw, o: rows.append(int(kw["input_ids"].shape[0])), with_kwargs=True)
    times = {"prefixtune": [], "transformers": []}
    steps, outputs = {}, {}
    for _ in range(repeats):
        for name, once in (("prefixtune", True), ("transformers", False)):
            rows.clear()
            seconds, outputs[name] = decode_all(multi, batches, kwargs, once)
            times[name].append(round(seconds, 2))
            steps[name] = sum(rows)
            print(f"{name}: {seconds:.1f} s, {steps[name]} row-steps", flush=True)
    same = outputs["prefixtune"] == outputs["transformers"]
    best = {k: min(v) for k, v in times.items()}
    result = {
        "command": "".join(f"{k}={os.environ[k]} " for k in ("PREFIX", "SOURCES", "REPEATS") if k in os.environ)
        + "python bench/decode_speed.py",
        "machine": machine(), "sources": len(sources), "num_beams": 5, "batch_size": 32, "precision": "fp32",
        "seconds": times, "best_seconds": best, "row_steps": steps,
        "speedup_vs_transformers": round(best["transformers"] / best["prefixtune"], 3),
        "row_steps_ratio": round(steps["prefixtune"] / steps["transformers"], 3), "identical_outputs": same,
    }
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "decode_speed.md").write_text(
        "| path | best of %d (s) | row-steps |\n|---|---:|---:|\n" % repeats
        + "".join(f"| {k} | {best[k]} | {steps[k]} |\n" for k in best)
        + f"\nSpeed-up {result['speedup_vs_transformers']}x, row-steps ratio {result['row_steps_ratio']}, identical "
        f"outputs: {same}. {len(sources)} E2E test MRs, beam 5, batches of 32, fp32. Machine: {result['machine']}. "
        f"Command: `{result['command']}`.\n")
    print(json.dumps({k: result[k] for k in ("best_seconds", "speedup_vs_transformers", "row_steps_ratio",
                                             "identical_outputs")}))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
