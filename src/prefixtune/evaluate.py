"""Generate for every source of a split and score it with the task's official metrics."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from . import precision
from .checkpoint import read_meta
from .config import GenerateConfig
from .multi import MultiPrefixModel
from .tasks import SourceGroup, load_groups

#: Metric family per task, and the keys shown in the table (in order).
TABLE_KEYS = {
    "e2e": ["bleu", "nist", "meteor", "rouge_l", "cider"],
    "dart": ["bleu", "meteor", "ter"],
    "jsonl": ["bleu", "meteor", "ter"],
    "summarization": ["rouge1", "rouge2", "rougeL"],
}


def score(task: str, predictions: list[str], groups: list[SourceGroup]) -> dict:
    """Official scores of `predictions` (one per group, in order) against the groups' references."""
    from . import metrics

    refs = [list(g.references) for g in groups]
    if task == "e2e":
        return metrics.e2e_scores(predictions, refs)
    if task == "webnlg":
        return metrics.webnlg_scores(predictions, refs, [bool(g.meta.get("seen")) for g in groups])
    if task == "summarization":
        return metrics.rouge_scores(predictions, refs)
    return metrics.dart_scores(predictions, refs)


def format_table(task: str, scores: dict) -> str:
    """A plain-text table: one row (or one per WebNLG split)."""
    if task == "webnlg":
        keys = ["bleu", "meteor", "ter"]
        lines = [f"{'split':8}" + "".join(f"{k:>10}" for k in keys)]
        for split in ("seen", "unseen", "all"):
            lines.append(f"{split:8}" + "".join(_cell(scores[split].get(k)) for k in keys))
        return "\n".join(lines)
    keys = TABLE_KEYS.get(task, list(scores))
    return "".join(f"{k:>10}" for k in keys) + "\n" + "".join(_cell(scores.get(k)) for k in keys)


def _cell(value) -> str:
    return f"{'n/a':>10}" if value is None else f"{value:>10.4f}" if abs(value) < 10 else f"{value:>10.2f}"


def evaluate(multi: MultiPrefixModel, task_name: str, task: str, split: str, output: str | Path,
             config: GenerateConfig, data_dir=None, path=None, limit: int | None = None) -> dict:
    """Generate with prefix `task_name` for the split's sources; write predictions.txt and scores.json."""
    groups = load_groups(task, split, data_dir, path=path)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        groups = groups[:limit]
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with tqdm(total=len(groups), desc="generate", unit="src", file=sys.stderr) as bar:
        predictions = multi.generate([g.source for g in groups], [task_name] * len(groups), config, bar.update)
    gen_seconds = time.time() - start
    (out / "predictions.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in predictions))
    scores = score(task, predictions, groups)
    decoding = {**vars(config), "bf16_used": precision.bf16_wanted(config.bf16, multi.base.device)}
    report = {"task": task, "split": split, "sources": len(groups), "limited": limit is not None,
              "generation_seconds": round(gen_seconds, 1), "decoding": decoding, "scores": scores}
    (out / "scores.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def prefix_summary(prefix_dir: str | Path) -> str:
    """One line on a saved prefix: size and how it was trained."""
    meta = read_meta(prefix_dir)
    size = (Path(prefix_dir) / "prefix.safetensors").stat().st_size
    training = meta.get("training", {})
    return (f"prefix {prefix_dir}: L={meta['prefix_length']}, {meta['num_parameters']:,} parameters, {size:,} bytes; "
            f"base {meta['base_model']['model_type']}" + (f"; trained on {training['data']}" if training else ""))
