"""Run the README's main job (scripts/main.sh) and record what it measured.

    python bench/e2e_main.py            # full E2E test set, beam 5 (the README's command)
    LIMIT=64 python bench/e2e_main.py   # any scripts/main.sh variable passes through

Writes bench/results/e2e_main-{bf16,fp32}.json and .md (by whether the run used bf16 autocast, so results
from both kinds of machine are kept side by side): scores (official E2E metrics), training
and generation time, total wall time, prefix size, and the machine.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from prefixtune import precision

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    """The CPU, what bf16 autocast does on it (precision.describe_cpu), cores and OS."""
    return (f"{precision.cpu_name()} ({precision.describe_cpu()}), {os.cpu_count()} cores, "
            f"{platform.system()} {platform.machine()}, no GPU")


def main() -> int:
    train_size = os.environ.get("TRAIN_SIZE", "300")
    run = ROOT / os.environ.get("RUN", f"runs/e2e-{train_size}")
    start = time.time()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "main.sh")], cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wall = time.time() - start
    sys.stdout.write(proc.stdout[-4000:])
    if proc.returncode:
        print(f"scripts/main.sh failed with exit code {proc.returncode}", file=sys.stderr)
        return proc.returncode
    summary = json.loads((run / "train_summary.json").read_text())
    report = json.loads((run / "eval" / "scores.json").read_text())
    result = {
        "command": "bash scripts/main.sh" + "".join(f" {k}={os.environ[k]}" for k in
                                                    ("TRAIN_SIZE", "EPOCHS", "LIMIT", "BEAMS", "SEED") if k in os.environ),
        "machine": machine(), "total_wall_seconds": round(wall, 1),
        "train": summary, "eval": {k: report[k] for k in ("task", "split", "sources", "limited", "generation_seconds")},
        "decoding": report["decoding"], "scores": report["scores"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "e2e_main-bf16" if report["decoding"]["bf16_used"] else "e2e_main-fp32"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    s = report["scores"]
    (RESULTS / f"{name}.md").write_text(
        "| data | model | prefix | train | generate | total | BLEU | NIST | METEOR | ROUGE-L | CIDEr |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| E2E: {summary['data'].split('.')[0]}; test {report['sources']} MRs | SmolLM2-135M-Instruct (frozen) "
        f"| L=10, {summary['prefix_parameters']:,} params, {summary['prefix_bytes']:,} bytes "
        f"| {summary['train_seconds']} s | {report['generation_seconds']} s | {wall:.0f} s "
        f"| {s['bleu']:.2f} | {s['nist']:.2f} | {s['meteor']:.2f} | {s['rouge_l']:.2f} | {s['cider']:.3f} |\n\n"
        f"Machine: {result['machine']}. Command: `{result['command']}`. Decoding: beam "
        f"{report['decoding']['num_beams']}, bf16 autocast {report['decoding']['bf16_used']}.\n")
    print((RESULTS / f"{name}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
