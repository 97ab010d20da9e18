"""Is `--bf16 auto` stable, and does it pick the faster precision for the real work?

    python bench/precision_check.py                      # 10 fresh decisions, then a short main job both ways
    DECISIONS=10 TRAIN_SIZE=300 EPOCHS=3 LIMIT= python bench/precision_check.py   # the full main job both ways

1. DECISIONS fresh decisions in a row, each in a new process with an empty cache folder (so each one
   measures): the training-step workload (SmolLM2-135M, L=10, the first length-grouped batch of 10 E2E
   pairs) and the decoding-step workload (32 sources x 5 beams = 160 lanes). Each records its ratios,
   median speed-up, whether it was clear enough to keep, and the decision. They should all agree.
2. The main job (scripts/main.sh's train + evaluate commands) with --bf16 on and --bf16 off, in the
   same sitting: wall times of training and decoding, and the scores. The decisions should match the faster.
Writes bench/results/precision_check.json and .md.
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
from e2e_main import machine  # noqa: E402

OUT = ROOT / "bench" / "results"

_DECIDE = r"""
import json, torch
from prefixtune import PrefixTuningModel, load_base_model, precision, train
from prefixtune.config import PrefixConfig, TextFormat, TrainConfig
from prefixtune.data import encode
from prefixtune.decoding.api import decode_workload
from prefixtune.tasks import load_groups, to_examples
base, tok = load_base_model()
cfg = TrainConfig(batch_size=10, prefix=PrefixConfig(prefix_length=10))
ptm = PrefixTuningModel(base, PrefixConfig(prefix_length=10), tok, TextFormat())
rows = encode(to_examples(load_groups("e2e", "train"))[:200], tok, TextFormat(), False)
out = {}
for name, work in (("train", train._train_workload(rows, cfg, torch.device("cpu"), tok.pad_token_id, ptm)),
                   ("decode", decode_workload(base, 160))):
    found = precision.measure(work)
    out[name] = {"speedup": found.speedup, "ratios": found.ratios, "clear": found.clear, "bf16": found.bf16,
                 "load": found.load}
print(json.dumps(out))
"""


def fresh_decisions(count: int) -> list[dict]:
    results = []
    for i in range(count):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "PREFIXTUNE_CACHE": cache}
            proc = subprocess.run([sys.executable, "-c", _DECIDE], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"decision {i} failed:\n{proc.stderr[-2000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"[precision_check] decision {i + 1}/{count}: {results[-1]}", flush=True)
    return results


def main_job(bf16: str, run: Path) -> dict:
    """scripts/main.sh's training and evaluation with an explicit precision; wall times and scores."""
    size, epochs, limit = os.environ.get("TRAIN_SIZE", "50"), os.environ.get("EPOCHS", "1"), os.environ.get("LIMIT", "64")
    train_cmd = [sys.executable, "-m", "prefixtune", "train", "--task", "e2e", "--train-size", size, "--seed", "0",
                 "--output", str(run), "--prefix-length", "10", "--lr", "5e-4", "--epochs", epochs, "--batch-size",
                 "10", "--no-progress", "--bf16", bf16]
    eval_cmd = [sys.executable, "-m", "prefixtune", "evaluate", "--prefix", str(run), "--task", "e2e", "--split",
                "test", "--output", str(run / "eval"), "--num-beams", "5", "--batch-size", "32", "--bf16", bf16]
    if limit:
        eval_cmd += ["--limit", limit]
    times = {}
    for name, cmd in (("train", train_cmd), ("decode", eval_cmd)):
        start = time.time()
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
        times[name] = round(time.time() - start, 1)
    scores = json.loads((run / "eval" / "scores.json").read_text())["scores"]
    return {"bf16": bf16, "train_size": int(size), "epochs": int(epochs), "limit": limit or None,
            "seconds": times, "bleu": scores["bleu"]}


def _markdown(report: dict) -> str:
    lines = ["| decision | train speed-up | train clear | train bf16 | decode speed-up | decode clear | decode bf16 |",
             "|---:|---:|---|---|---:|---|---|"]
    for i, d in enumerate(report["decisions"], 1):
        lines.append(f"| {i} | {d['train']['speedup']:.2f} | {d['train']['clear']} | {d['train']['bf16']} | "
                     f"{d['decode']['speedup']:.2f} | {d['decode']['clear']} | {d['decode']['bf16']} |")
    lines += ["", "| main job | train s | decode s | BLEU |", "|---|---:|---:|---:|"]
    for job in report["main_job"]:
        lines.append(f"| --bf16 {job['bf16']} | {job['seconds']['train']} | {job['seconds']['decode']} | {job['bleu']:.2f} |")
    lines += ["", f"Agreement: {report['agreement']}. Faster in the main job: {report['faster']}. ",
              f"Machine: {report['machine']}. Command: `{report['command']}`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    decisions = fresh_decisions(int(os.environ.get("DECISIONS", "10")))
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [main_job(mode, Path(tmp) / mode) for mode in ("on", "off")]
    faster = {part: ("bf16" if jobs[0]["seconds"][part] < jobs[1]["seconds"][part] else "fp32")
              for part in ("train", "decode")}
    agreement = {part: sorted({("bf16" if d[part]["bf16"] else "fp32") for d in decisions}) for part in ("train", "decode")}
    report = {"decisions": decisions, "main_job": jobs, "faster": faster, "agreement": agreement,
              "machine": machine(), "command": " ".join(f"{k}={os.environ[k]}" for k in
                                                         ("DECISIONS", "TRAIN_SIZE", "EPOCHS", "LIMIT") if k in os.environ)
              + " python bench/precision_check.py"}
    (OUT / "precision_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (OUT / "precision_check.md").write_text(_markdown(report))
    print(_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
