"""The serve bench's mixed-task scenario on two code versions, alternating, in one run on one machine.

    python bench/serve_before_after.py BEFORE_COMMIT [--rounds 2] [--requests 48] [--after-args '--bf16 auto']

Checks BEFORE_COMMIT out into a temporary git worktree and runs `bench/serve_bench.py` of each version
(its own src/ on PYTHONPATH) in turns: before, after, before, after... Writes
bench/results/serve_before_after.{json,md}: tokens/s of every scenario per run and the after/before ratio
of the medians for (b), 8 tasks interleaved in mixed batches. Each --after-args adds a third version: the
working tree's servers started with those flags (what a setting, not the code, changes).
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


def run_version(tree: Path, out: Path, args, server_args: str = "") -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cmd = [sys.executable, str(tree / "bench" / "serve_bench.py"), "--rounds", "1", "--requests", str(args.requests),
           "--out", str(out)] + (["--server-args", server_args] if server_args else [])
    subprocess.run(cmd, env=env, check=True, cwd=tree)
    return json.loads((out / "serve_bench.json").read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("before", help="commit to compare against (the working tree is 'after')")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--after-args", action="append", default=[], metavar="FLAGS",
                   help="also run 'after' with these `prefixtune serve` flags (e.g. '--bf16 auto'); repeatable")
    args = p.parse_args()
    after_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip()
    versions = [("before", "", True), ("after", "", False)] + [(f"after {a}", a, False) for a in args.after_args]
    runs: dict[str, list] = {name: [] for name, _, _ in versions}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.before], cwd=ROOT, check=True)
        try:
            for r in range(args.rounds):
                for i, (name, flags, old) in enumerate(versions):
                    result = run_version(tree if old else ROOT, Path(tmp) / f"v{i}-{r}", args, flags)
                    runs[name].append({k: v["tokens_per_s"] for k, v in result["scenarios"].items()})
                    print(name, r, runs[name][-1], flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    med = {n: statistics.median(x["b"] for x in v) for n, v in runs.items()}
    report = {"before": args.before, "after": after_commit, "machine": platform.processor() or platform.machine(),
              "cpu_count": os.cpu_count(), "load_after": [round(x, 2) for x in os.getloadavg()],
              "requests": args.requests, "runs": runs, "b_median_tokens_per_s": med,
              "b_over_before": {n: round(m / med["before"], 3) for n, m in med.items() if n != "before"}}
    out = ROOT / "bench" / "results"
    (out / "serve_before_after.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# Serve bench before/after ({args.before} vs {after_commit}, alternating, same run)", "",
             "| run | version | (a) one task | (b) 8 tasks mixed | (c) one task per batch |", "|---|---|---:|---:|---:|"]
    for r in range(args.rounds):
        for name in runs:
            x = runs[name][r]
            lines.append(f"| {r} | {name} | {x.get('a')} | {x.get('b')} | {x.get('c')} |")
    lines += ["", f"(b) median tokens/s: before {med['before']}; " + "; ".join(
        f"{n} {med[n]}: **{ratio}x**" for n, ratio in report["b_over_before"].items()),
        "", f"Machine: {report['machine']}, {report['cpu_count']} cores; load average at the end {report['load_after']}. "
        f"Command: `python bench/serve_before_after.py {' '.join(sys.argv[1:])}`", ""]
    (out / "serve_before_after.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
