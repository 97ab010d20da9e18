"""Generate for every source of a split and score it with the task's official metrics."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .decoding.api import decode_bf16
from .checkpoint import read_meta
from .config import GenerateConfig
from .multi import MultiPrefixModel
from .tasks import TASKS, SourceGroup, get_task, load_groups

#: The keys each task's table shows, in order; read from the specs (``TaskSpec.metrics``), which own them.
TABLE_KEYS = {name: list(spec.metrics.table_keys) for name, spec in TASKS.items()}


def score(task: str, predictions: list[str], groups: list[SourceGroup]) -> dict:
    """Official scores of `predictions` (one per group, in order) against the groups' references, with the
    task's metric set; a ValueError naming the known tasks for an unknown task."""
    return get_task(task).metrics.score(predictions, groups)


def format_table(task: str, scores: dict) -> str:
    """A plain-text table of `scores` as the task's metric set lays it out (WebNLG: one row per split)."""
    return get_task(task).metrics.format_table(scores)


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
    decoding = {**vars(config), "bf16_used": decode_bf16(multi.base, config, len(groups))}
    report = {"task": task, "split": split, "sources": len(groups), "limited": limit is not None,
              "generation_seconds": round(gen_seconds, 1), "decoding": decoding, "scores": scores}
    (out / "scores.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def prefix_summary(prefix_dir: str | Path) -> str:
    """One line on a saved prefix: size and how it was trained (for a PEFT checkpoint: its file and size)."""
    from .peft_import import is_peft_checkpoint

    if is_peft_checkpoint(prefix_dir):
        weights = Path(prefix_dir) / "adapter_model.safetensors"
        return f"prefix {prefix_dir}: a PEFT PrefixTuning checkpoint, {weights.stat().st_size:,} bytes"
    meta = read_meta(prefix_dir)
    size = (Path(prefix_dir) / "prefix.safetensors").stat().st_size
    training = meta.get("training", {})
    return (f"prefix {prefix_dir}: L={meta['prefix_length']}, {meta['num_parameters']:,} parameters, {size:,} bytes; "
            f"base {meta['base_model']['model_type']}" + (f"; trained on {training['data']}" if training else ""))
