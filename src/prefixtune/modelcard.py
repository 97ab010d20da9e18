"""README.md next to a saved prefix: a model card the Hugging Face Hub reads (YAML front matter) and people read.

`save_pretrained` writes it from the facts it has (the base model, the prefix's size) and those its caller
passes (`card=`: train.py passes the task, data, steps and losses; scores when a caller has them). The card
records the SHA-256 of the weights it describes, so a card left over from another save of the same directory
(a kill between the prefix's commit and the card's rename) is recognised, and `prefixtune push` refuses it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import artifact

CARD_NAME = "README.md"

#: aliases of load_base_model -> the Hub id of the model they are (the front matter's base_model must be a Hub id)
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
#: task -> its dataset on the Hub, where there is a canonical one (jsonl/summarization: the user's own files)
DATASETS = {"e2e": "tuetschek/e2e_nlg", "webnlg": "webnlg-challenge/web_nlg", "dart": "Yale-LILY/dart"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA_LINE = re.compile(r"prefix\.safetensors SHA-256: `([0-9a-f]{64})`")


@dataclass
class CardFacts:
    """What a card says; None or empty: not known, left out."""

    base_model: str
    """The base model as it was named (alias, Hub id or local path)."""
    model_type: str
    prefix_parameters: int
    """Numbers in the saved prefix P (keys and values of every layer)."""
    base_parameters: int
    prefix_length: int
    weights_sha256: str
    task: str | None = None
    train_pairs: int | None = None
    dev_pairs: int | None = None
    data: str | None = None
    """How the data was drawn (train.py's note)."""
    steps: int | None = None
    """Optimizer steps when this prefix was saved (the best on dev so far)."""
    total_steps: int | None = None
    train_loss: float | None = None
    dev_loss: float | None = None
    scores: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "CardFacts":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model card facts {unknown}; known: {sorted(known)}")
        return cls(**data)


def hub_id(name: str) -> str | None:
    """The Hub id a base model name stands for, None for a local path or file (not a Hub repository)."""
    name = HUB_IDS.get(name, name)
    if not _HUB_ID.match(name) or Path(name).exists():
        return None
    return name


def _front_matter(f: CardFacts) -> str:
    # json.dumps: a JSON string is a valid YAML scalar, quoted whatever characters a name holds
    lines = ["---", "library_name: prefixtune"]
    if hub_id(f.base_model):
        lines.append(f"base_model: {json.dumps(hub_id(f.base_model))}")
    lines += ["tags:", "- prefix-tuning", "- prefixtune"]
    if f.task in DATASETS:
        lines += ["datasets:", f"- {json.dumps(DATASETS[f.task])}"]
    if f.scores:
        lines += ["metrics:", *(f"- {json.dumps(name)}" for name in f.scores)]
    return "\n".join(lines + ["---", ""])


def _results(f: CardFacts) -> list[str]:
    rows = [("train loss (last step before this save)", f.train_loss), ("dev loss", f.dev_loss)]
    rows += [(name, value) for name, value in f.scores.items()]
    known = [(name, value) for name, value in rows if value is not None]
    if not known:
        return []
    return ["## Results", "", "| metric | value |", "|---|---:|",
            *(f"| {name} | {value:.4f} |" for name, value in known), ""]


def render(facts: CardFacts | dict) -> str:
    """The card's text (front matter and Markdown body)."""
    f = facts if isinstance(facts, CardFacts) else CardFacts.from_dict(facts)
    share = 100 * f.prefix_parameters / f.base_parameters if f.base_parameters else 0.0
    base = hub_id(f.base_model) or f.base_model
    lines = [_front_matter(f), f"# Prefix for {base}" + (f" ({f.task})" if f.task else ""), "",
             f"A prefix-tuning prefix (Li & Liang, 2021) trained with prefixtune over the "
             f"frozen base model `{base}` ({f.model_type}): only the prefix is stored, not the base weights.", "",
             "## Training", "", f"- base model: `{base}` ({f.base_parameters:,} parameters, frozen)"]
    if f.task:
        lines.append(f"- task: {f.task}")
    if f.train_pairs is not None:
        dev = f", {f.dev_pairs} dev pairs" if f.dev_pairs is not None else ""
        lines.append(f"- data: {f.train_pairs} training pairs{dev}")
    if f.data:
        lines.append(f"- data source: {f.data}")
    if f.steps is not None:
        lines.append(f"- training steps: {f.steps}" + (f" of {f.total_steps}" if f.total_steps else "")
                     + " (the prefix with the best dev loss is kept)")
    lines += [f"- prefix: length {f.prefix_length}, {f.prefix_parameters:,} parameters ({share:.2f}% of the base "
              "model)", f"- prefix.safetensors SHA-256: `{f.weights_sha256}`", ""]
    lines += _results(f)
    lines += ["## How to use", "", "```python", "from prefixtune import PrefixTuningModel, load_base_model", "",
              f"base, tokenizer = load_base_model({json.dumps(base)})",
              'model = PrefixTuningModel.from_pretrained(base, "path/to/this/folder", tokenizer=tokenizer)',
              "```", "", "From the Hub, download the folder first (`huggingface_hub.snapshot_download(REPO_ID)`); "
              f"from the command line: `prefixtune generate --model {base} --prefix TASK=FOLDER`.", ""]
    return "\n".join(lines)


def write(directory: Path, text: str) -> Path:
    """README.md in `directory`, written under a temporary name and renamed into place (never half a card)."""
    target = Path(directory) / CARD_NAME
    tmp = artifact.temporary_file(target)
    try:
        tmp.write_text(text, encoding="utf-8")
        artifact.fsync(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    artifact.remove_stale(Path(directory), (CARD_NAME,))
    return target


def described_weights(text: str) -> str | None:
    """The weights checksum a card names, None for a card written by hand or by something else."""
    match = _SHA_LINE.search(text)
    return match.group(1) if match else None


__all__ = ["CardFacts", "render", "write", "hub_id", "described_weights", "CARD_NAME"]
