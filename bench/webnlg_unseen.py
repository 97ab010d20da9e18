"""WebNLG 2017 seen vs unseen categories: prefix-tuning vs full fine-tuning (the paper's extrapolation claim).

    python bench/webnlg_unseen.py              # 500 training pairs, seed 0, 200 steps, 100 seen + 100 unseen test entries
    SIZE=1000 SEEDS="0 1" STEPS=300 LIMIT=200 METHODS="prefix prefix-random finetune" python bench/webnlg_unseen.py

The training split has 10 DBpedia categories; the test set adds 5 the model never saw in training
("unseen"). The paper (Table 1, GPT-2 medium) finds prefix-tuning ahead of fine-tuning on the unseen
categories, because the frozen LM keeps its general ability. Both methods here see the same training
subset, steps, batch (10), text format and greedy decoding on SmolLM2-135M-Instruct, as in
bench/lowdata.py (prefix: lr 5e-4, init from "table-to-text:"; fine-tuning: every weight, lr 5e-5). The test
entries are a fixed sample (seed 0, independent of the training seed) of LIMIT seen and LIMIT unseen
entries, scored with the challenge's BLEU, METEOR and TER per split. Finished runs are kept in
bench/results/webnlg_unseen.json (per settings), so an interrupted bench resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from lowdata import METHODS, RESULTS_DIR, precision_note, run_missing  # noqa: E402

from prefixtune.tasks import load_groups  # noqa: E402

SPLITS = ("seen", "unseen", "all")


def test_sample(limit: int) -> list:
    """`limit` seen and `limit` unseen test entries, drawn with seed 0, in test-file order."""
    groups = load_groups("webnlg", "test")
    seen = [i for i, g in enumerate(groups) if g.meta["seen"]]
    unseen = [i for i, g in enumerate(groups) if not g.meta["seen"]]
    rng = random.Random(0)
    picked = rng.sample(seen, min(limit, len(seen))) + rng.sample(unseen, min(limit, len(unseen)))
    return [groups[i] for i in sorted(picked)]


def write_table(results: dict, meta: dict, path: Path) -> None:
    """Per run: BLEU / METEOR / TER on seen, unseen and all; then the unseen-minus-seen BLEU gap."""
    head = "| seed | method | trained params | " + " | ".join(
        f"{split} {metric}" for split in SPLITS for metric in ("BLEU", "METEOR", "TER")) + " | train s |"
    lines = [head, "|---:|---|---:|" + "---:|" * (3 * len(SPLITS)) + "---:|"]
    for key in sorted(results, key=lambda k: (int(k.split("/")[0]), k.split("/")[1])):
        seed, method = key.split("/")
        r, s = results[key], results[key]["scores"]
        cells = [_cell(s[split][metric]) for split in SPLITS for metric in ("bleu", "meteor", "ter")]
        lines.append(f"| {seed} | {method} | {r['trained_parameters']:,} | " + " | ".join(cells)
                     + f" | {r['train_seconds']} |")
    path.with_suffix(".md").write_text(
        "\n".join(lines) + f"\n\n{precision_note(results)}.\n\nTraining: {meta['size']} WebNLG train pairs (seen "
        f"categories only), {meta['steps']} optimizer steps of 10 pairs. Test: {meta['limit']} seen + "
        f"{meta['limit']} unseen entries (fixed sample, seed 0), greedy. TER: lower is better. "
        f"Command: `{meta['command']}`.\n")


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def main() -> int:
    size = int(os.environ.get("SIZE", "500"))
    seeds = [int(x) for x in os.environ.get("SEEDS", "0").split()]
    steps, limit = int(os.environ.get("STEPS", "200")), int(os.environ.get("LIMIT", "100"))
    methods = os.environ.get("METHODS", "prefix finetune").split()
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"unknown METHODS {sorted(unknown)}; choose from {list(METHODS)}")
    path = RESULTS_DIR / f"webnlg_unseen-size{size}-steps{steps}-limit{limit}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    env = " ".join(f"{k}={os.environ[k]!r}" for k in ("SIZE", "SEEDS", "STEPS", "LIMIT", "METHODS") if k in os.environ)
    meta = {"size": size, "steps": steps, "limit": limit, "command": f"{env} python bench/webnlg_unseen.py".strip()}
    results["_meta"] = meta
    groups = test_sample(limit)
    run_missing(results, path, [(f"{seed}/{method}", lambda seed=seed, method=method:
                                 METHODS[method](size, seed, steps, groups, task="webnlg"))
                                for seed in seeds for method in methods])
    write_table({k: v for k, v in results.items() if k != "_meta"}, meta, path)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
