"""Reproduce the paper's claims with baselines: one resumable harness, one result file per run.

    python bench/reproduce.py plan                       # every run, in the order they are run, and which exist
    python bench/reproduce.py run --budget-min 120       # run missing runs in order until the budget is spent
    python bench/reproduce.py run --only lowdata         # only runs whose id contains this text
    python bench/reproduce.py report                     # REPORT.md and its plots from the result files

Each finished run is bench/results/reproduce/runs/<run id>.json (scores, predictions, machine, precision,
code version, wall times); rerunning skips it. A run killed while training resumes from its state in
runs/reproduce/<run id>/ (prefixtune's resume state, or the baseline loop's state.pt); a run killed while
decoding keeps its finished chunks. Same model (SmolLM2-135M-Instruct), data splits (prefixtune.tasks),
loss and decoding for every method (bench/repro_methods.py); test decoding is the paper's (beam 5, min 5
and max 100 new tokens, newlines blocked). Learning rates are not copied: each method's is picked from
GRIDS by greedy BLEU on the held-out dev pairs of the 200-pair, seed-0 E2E subset (the "grid" runs), and that
choice is used in every experiment.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results" / "reproduce" / "runs"
WORK = ROOT / "runs" / "reproduce"

INIT_TEXT = "table-to-text:"
METHODS = ("prefix", "finetune", "ft-top2", "lora-matched", "lora-r8", "prompt", "peft-prefix")
# Learning-rate grids (written down, as the issue asks): three values around each method's usual rate,
# widened past an edge when the best dev BLEU fell on it (prefix: 8e-4 beat 2e-4 and 5e-5, so 3e-3 was added;
# finetune: 1e-5 (28.04) edged out 5e-5 (27.82) and 2e-4 (23.97), so 3e-6 was added).
GRIDS = {"prefix": (5e-5, 2e-4, 8e-4, 3e-3), "finetune": (3e-6, 1e-5, 5e-5, 2e-4), "ft-top2": (5e-5, 2e-4, 1e-3),
         "lora-matched": (1e-4, 5e-4, 2e-3), "lora-r8": (1e-4, 5e-4, 2e-3), "prompt": (1e-3, 1e-2, 3e-2)}
# PEFT's prefix-tuning is the same method: it uses the rate picked for ours, so only the implementation differs.
SAME_LR_AS = {"peft-prefix": "prefix"}
LOW_DATA_SIZES, LOW_DATA_SEEDS, LOW_DATA_STEPS = (50, 100, 200, 500), (0, 1, 2, 3, 4), 200
LOW_DATA_METHODS = ("prefix", "finetune", "lora-matched")
SMOKE = {"on": False}  # --smoke: 4 steps, 6 sources, results under /tmp (checks the harness, not the paper)


@dataclass(frozen=True)
class RunSpec:
    """One training run and its evaluation."""

    experiment: str
    """grid (lr selection, scored on dev), lowdata, ablation, e2e-full, webnlg."""
    method: str
    """One of METHODS."""
    task: str = "e2e"
    train_size: int | None = 200
    """Pairs drawn from the training pool with `seed` (None: the whole pool less 5% of sources for dev)."""
    seed: int = 0
    lr: float | None = None
    """None: the rate the grid picked for this method."""
    steps: int = LOW_DATA_STEPS
    prefix_length: int = 10
    init_text: str | None = None
    reparam: str = "mlp"
    variant: str = "prefix"
    label: str = ""
    """The ablation's name, part of the run id."""

    @property
    def run_id(self) -> str:
        size = "full" if self.train_size is None else str(self.train_size)
        lr = "" if self.experiment != "grid" else f"-lr{self.lr:g}"
        label = f"-{self.label}" if self.label else ""
        return f"{self.experiment}-{self.task}-{self.method}{label}-{size}-s{self.seed}{lr}"


def grid_runs() -> list[RunSpec]:
    return [RunSpec("grid", m, lr=lr) for m in GRIDS for lr in GRIDS[m]]


def ablation_runs() -> list[RunSpec]:
    """E2E, 500 pairs, 3 seeds; the reference row is L=10, MLP, random init, prefix (not infix)."""
    variants = [(f"L{n}", {"prefix_length": n}) for n in (1, 5, 10, 20, 40)]
    variants += [("table", {"reparam": "table"}), ("words", {"init_text": INIT_TEXT}),
                 ("infix", {"variant": "infix"})]
    runs = [RunSpec("ablation", "prefix", train_size=500, seed=s, label=name, **kw) for s in range(3)
            for name, kw in variants]
    return runs + [RunSpec("ablation", "prompt", train_size=500, seed=s, label="embedding") for s in range(3)]


def plan() -> list[RunSpec]:
    """Every run, cheapest and most decisive first, so that partial progress fills whole table cells."""
    runs = grid_runs()
    for seed in LOW_DATA_SEEDS:
        runs += [RunSpec("lowdata", m, train_size=n, seed=seed) for n in LOW_DATA_SIZES for m in LOW_DATA_METHODS]
    full_steps = 5 * 444  # 5 epochs of batch 10 over the ~4,440 pairs left after the 5% dev hold-out
    runs += [RunSpec("e2e-full", m, train_size=None, steps=full_steps) for m in METHODS]
    runs += ablation_runs()
    runs += [RunSpec("webnlg", m, task="webnlg", train_size=1000, seed=s, steps=500)
             for s in range(3) for m in LOW_DATA_METHODS]
    return runs


def result_path(spec: RunSpec) -> Path:
    return RESULTS / f"{spec.run_id}.json"


def chosen_lr(method: str) -> float | None:
    """The grid's pick for `method` (highest dev BLEU), or None while its grid runs are missing."""
    method = SAME_LR_AS.get(method, method)
    scores = {}
    for spec in grid_runs():
        if spec.method == method:
            path = result_path(spec)
            if not path.is_file():
                return None
            scores[spec.lr] = json.loads(path.read_text())["scores"]["bleu"]
    return max(scores, key=scores.get)


def machine() -> str:
    from e2e_main import machine as describe

    return describe()


@functools.lru_cache(maxsize=None)
def code_version() -> str:
    """The commit (and whether src/ had uncommitted changes) when this process started running."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True)
    return head.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _eval_groups(spec: RunSpec):
    """(groups, GenerateConfig): dev pairs grouped by source and greedy for the grid; the test split and beam 5."""
    from prefixtune import GenerateConfig
    from prefixtune.tasks import load_groups
    from prefixtune.tasks.base import group_pairs
    from prefixtune.train import load_training_data
    from repro_methods import train_config

    if spec.experiment == "grid":
        _, dev, _ = load_training_data(train_config(spec, WORK / spec.run_id))
        groups, config = group_pairs((e.source, e.target) for e in dev), GenerateConfig(num_beams=1, batch_size=32)
    else:
        groups, config = load_groups(spec.task, "test"), GenerateConfig(num_beams=5, batch_size=32)
    config.bf16 = "auto"
    return (groups[:6] if SMOKE["on"] else groups), config


def execute(spec: RunSpec) -> dict:
    """Train, decode and score one run; write its result file atomically and return it."""
    import torch
    from prefixtune import precision
    from prefixtune.evaluate import score
    from repro_methods import decode, run_method

    start = time.time()
    out = WORK / spec.run_id
    out.mkdir(parents=True, exist_ok=True)
    multi, facts = run_method(spec, out)
    groups, config = _eval_groups(spec)
    predictions, seconds = decode(multi, groups, config, out / "predictions.partial.jsonl")
    result = {"run": asdict(spec), "run_id": spec.run_id, "scores": score(spec.task, predictions, groups),
              **facts, "generation_seconds": seconds, "decoding": asdict(config), "sources": len(groups),
              "bf16": precision.bf16_wanted("auto", torch.device("cpu")), "machine": machine(),
              "code_version": code_version(), "wall_seconds_this_sitting": round(time.time() - start, 1),
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "predictions": predictions}
    path = result_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    return result


def pending(only: str | None) -> list[RunSpec]:
    """Runs without a result whose learning rate is known (grid runs first make later ones runnable)."""
    todo = []
    for spec in plan():
        if result_path(spec).is_file() or (only and only not in spec.run_id):
            continue
        if spec.lr is None:
            lr = chosen_lr(spec.method)
            if lr is None:
                continue
            spec = replace(spec, lr=lr)
        todo.append(spec)
    return todo


def cmd_run(args) -> int:
    global RESULTS, WORK
    if args.smoke:
        SMOKE["on"], RESULTS, WORK = True, Path("/tmp/reproduce-smoke/results"), Path("/tmp/reproduce-smoke/work")
    deadline = time.time() + args.budget_min * 60
    code_version()  # taken now: the code this process imported, not what HEAD is when a run finishes
    while time.time() < deadline:
        todo = pending(args.only)
        if not todo:
            print("nothing left to run" + (f" matching {args.only!r}" if args.only else ""))
            return 0
        spec = replace(todo[0], steps=4) if args.smoke else todo[0]
        print(f"[reproduce] {spec.run_id} (lr {spec.lr:g}, {spec.steps} steps)", flush=True)
        result = execute(spec)
        main = result["scores"].get("bleu", result["scores"].get("all", {}).get("bleu"))
        print(f"[reproduce] {spec.run_id}: BLEU {main}, train {result['train_seconds']} s, "
              f"decode {result['generation_seconds']} s", flush=True)
    print("[reproduce] time budget spent; rerun to continue")
    return 0


def cmd_plan(args) -> int:
    for spec in plan():
        state = "done" if result_path(spec).is_file() else "todo"
        if not args.only or args.only in spec.run_id:
            print(f"{state}  {spec.run_id}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("plan", "run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--only", default=None, help="only runs whose id contains this text")
        if name == "run":
            p.add_argument("--budget-min", type=float, default=60.0, help="start no new run after this many minutes")
            p.add_argument("--smoke", action="store_true", help="4 steps and 6 sources per run, results under /tmp")
    args = parser.parse_args(argv)
    if args.command == "report":
        from repro_report import write_report

        print(write_report())
        return 0
    return {"plan": cmd_plan, "run": cmd_run}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
