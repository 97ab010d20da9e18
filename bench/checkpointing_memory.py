"""Peak memory of `prefixtune train` with and without --gradient-checkpointing, on the default model.

    python bench/checkpointing_memory.py            # ~3 min on 2 CPU cores
    BATCH=64 STEPS=2 python bench/checkpointing_memory.py

Each setting trains in a process of its own (the same pairs, steps and seed) and reports that process's peak
resident memory (ru_maxrss) and its wall time; the whole frozen model (fp32) is part of both peaks, so the
difference is what checkpointing saves in activations. Writes bench/results/checkpointing_memory.{json,md}.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

# the child: train, then print its own peak RSS (KiB on Linux) as the last line
CHILD = ("import resource, sys; from prefixtune.cli import main; code = main(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")


def run(flag: str, out: Path, batch: int, steps: int) -> dict:
    argv = ["train", "--task", "e2e", "--train-size", str(batch * steps + 20), "--batch-size", str(batch),
            "--max-steps", str(steps), "--eval-every", str(steps), "--bf16", "off", "--no-progress",
            "--output", str(out), flag]
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{flag} run failed:\n{proc.stderr[-3000:]}")
    return {"peak_rss_mib": round(int(proc.stdout.strip().splitlines()[-1]) / 1024, 1),
            "wall_seconds": round(time.time() - start, 1)}


def main() -> int:
    from e2e_main import machine

    batch, steps = int(os.environ.get("BATCH", "32")), int(os.environ.get("STEPS", "2"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for flag in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
            results[flag.removeprefix("--")] = run(flag, Path(tmp) / flag, batch, steps)
            print(flag, results[flag.removeprefix("--")], flush=True)
    plain, ckpt = results["no-gradient-checkpointing"], results["gradient-checkpointing"]
    report = {"command": "".join(f"{k}={os.environ[k]} " for k in ("BATCH", "STEPS") if k in os.environ)
              + "python bench/checkpointing_memory.py", "machine": machine(), "model": "smollm2-135m (fp32)",
              "batch_size": batch, "steps": steps, "results": results,
              "peak_saved_mib": round(plain["peak_rss_mib"] - ckpt["peak_rss_mib"], 1),
              "time_ratio": round(ckpt["wall_seconds"] / plain["wall_seconds"], 3)}
    out = ROOT / "bench" / "results"
    (out / "checkpointing_memory.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "checkpointing_memory.md").write_text(
        f"# Gradient checkpointing: peak memory of `prefixtune train` (smollm2-135m, fp32, batch {batch}, "
        f"{steps} steps, E2E)\n\n| setting | peak RSS (MiB) | wall (s), load + train + dev |\n|---|---:|---:|\n"
        + "".join(f"| {k} | {v['peak_rss_mib']} | {v['wall_seconds']} |\n" for k, v in results.items())
        + f"\nCheckpointing saves {report['peak_saved_mib']} MiB of peak memory here; the run takes "
        f"{report['time_ratio']}x as long. Machine: {report['machine']}. Command: `{report['command']}`.\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
