"""The serve bench's mixed-task scenario on two code versions, alternating, in one run on one machine.

    python bench/serve_before_after.py BEFORE_COMMIT [--rounds 2] [--requests 48]

Checks BEFORE_COMMIT out into a temporary git worktree and runs `bench/serve_bench.py` of each version
(its own src/ on PYTHONPATH) in turns: before, after, before, after... Writes
bench/results/serve_before_after.{json,md}: tokens/s of every scenario per run and the after/before ratio
of the medians for (b), 8 tasks interleaved in mixed batches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_version(tree: Path, out: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cmd = [sys.executable, str(tree / "bench" / "serve_bench.py"), "--rounds", "1", "--requests", str(args.requests),
           "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, cwd=tree)
    return json.loads((out / "serve_bench.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before", help="commit to compare against (the working tree is 'after')")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=48)
    args = p.parse_args()
    after_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip()
    runs = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=ROOT, check=True)
        try:
            for r in range(args.rounds):
                for name, src in (("before", tree), ("after", ROOT)):
                    result = run_version(src, Path(tmp) / f"{name}{r}", args)
                    runs[name].append({k: v["tokens_per_s"] for k, v in result["scenarios"].items()})
                    print(name, r, runs[name][-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    med = {n: statistics.median(x["b"] for x in v) for n, v in runs.items()}
    report = {"before": args.before, "after": after_commit, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "requests": args.requests, "runs": runs,
              "b_median_tokens_per_s": med, "b_after_over_before": round(med["after"] / med["before"], 3)}
    out = ROOT / "bench" / "results"
    (out / "serve_before_after.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Serve bench before/after ({args.before} vs {after_commit}, alternating, same run)", "",
             "| run | version | (a) one task | (b) 8 tasks mixed | (c) one task per batch |", "|---|---|---:|---:|---:|"]
    for r in range(args.rounds):
        for name in ("before", "after"):
            x = runs[name][r]
            lines.append(f"| {r} | {name} | {x.get('a')} | {x.get('b')} | {x.get('c')} |")
    lines += ["", f"(b) median tokens/s: before {med['before']}, after {med['after']}: "
              f"**{report['b_after_over_before']}x**", ""]
    (out / "serve_before_after.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
