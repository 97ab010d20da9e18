"""`MultiPrefixModel`: one frozen base model serving many named prefixes, mixed freely within a batch."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedModel

from . import checkpoint, inject
from .config import GenerateConfig, TextFormat
from .decoding import generate_ids, generate_texts
from .peft_import import is_peft_checkpoint, load_peft_prefix
from .prefix import PrefixKV


@dataclass
class NamedPrefix:
    """A loaded prefix under the name requests pick it by, and the text format it was trained with.

    The server and `MultiPrefixModel.generate(tasks=...)` call such a name a task; a dataset is a
    `tasks.TaskSpec`, a different thing."""

    name: str
    prefix: PrefixKV
    text_format: TextFormat
    source: str = ""
    """Where it was loaded from (directory), for listings."""


class MultiPrefixModel:
    """Holds the base model once and any number of prefixes; each generated row picks its own.

    `generate(inputs, tasks)` batches rows of different tasks (and prefix lengths) together; a task of
    None runs the plain base model for that row. Thread-safe for adding/removing tasks while another
    thread generates (a batch keeps the prefixes it started with).
    """

    def __init__(self, base: PreTrainedModel, tokenizer=None):
        self.base = base.eval()
        base.requires_grad_(False)
        self.tokenizer = tokenizer
        self.slots, self.shapes = inject.prepare(base)
        self._tasks: dict[str, NamedPrefix] = {}
        self._lock = threading.Lock()

    # --- the task table --------------------------------------------------------------------------
    def add(self, name: str, prefix: "PrefixKV | str | os.PathLike", text_format: TextFormat | None = None) -> NamedPrefix:
        """Add or replace task `name` from a saved prefix directory, a PEFT PrefixTuning checkpoint directory
        (adapter_config.json + adapter_model.safetensors) or a PrefixKV. `text_format` overrides a saved
        prefix's own; PEFT checkpoints and PrefixKVs have none, so theirs is `text_format` or the default."""
        if not name or not isinstance(name, str):
            raise ValueError(f"task name must be a non-empty string, got {name!r}")
        if isinstance(prefix, PrefixKV):
            if prefix.shapes() != self.shapes:
                raise checkpoint.PrefixMismatchError(
                    f"prefix for task {name!r} has [{checkpoint.describe_shapes(prefix.shapes())}], this model "
                    f"has [{checkpoint.describe_shapes(self.shapes)}]"
                )
            task = NamedPrefix(name, prefix.detach(), text_format or TextFormat())
        elif is_peft_checkpoint(prefix):  # PEFT saves no text format: the caller's, else the default
            peft = load_peft_prefix(prefix, self.base, self.shapes)
            task = NamedPrefix(name, peft, text_format or TextFormat(), str(prefix))
        else:
            loaded = checkpoint.load_for(prefix, self.base, self.shapes)
            task = NamedPrefix(name, loaded.prefix, text_format or loaded.text_format, str(prefix))
        with self._lock:
            self._tasks[name] = task
        return task

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self._tasks:
                raise KeyError(self._unknown(name))
            del self._tasks[name]

    def tasks(self) -> dict[str, NamedPrefix]:
        with self._lock:
            return dict(self._tasks)

    def _unknown(self, name) -> str:
        return f"unknown task {name!r}; loaded tasks: {sorted(self._tasks) or 'none'}"

    def _resolve(self, tasks: Sequence[str | None]) -> list[NamedPrefix | None]:
        with self._lock:
            missing = sorted({t for t in tasks if t is not None and t not in self._tasks})
            if missing:
                raise KeyError(self._unknown(missing[0]))
            return [None if t is None else self._tasks[t] for t in tasks]

    # --- running ---------------------------------------------------------------------------------
    def generate(self, inputs: Sequence[str], tasks: Sequence[str | None], config: GenerateConfig | None = None,
                 progress=None) -> list[str]:
        """One output text per input; row i uses the prefix and text format of tasks[i]."""
        if self.tokenizer is None:
            raise ValueError("MultiPrefixModel.generate needs a tokenizer; pass tokenizer= or use generate_ids")
        if len(inputs) != len(tasks):
            raise ValueError(f"{len(inputs)} inputs but {len(tasks)} tasks: give one task per input")
        resolved = self._resolve(tasks)
        prefixes = [None if t is None else t.prefix for t in resolved]
        formats = [TextFormat() if t is None else t.text_format for t in resolved]
        return generate_texts(self.base, self.tokenizer, prefixes, inputs, formats, config, progress)

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, tasks: Sequence[str | None], attention_mask=None, **kwargs):
        """Token-level `generate` over a left-padded batch, row i with tasks[i]'s prefix."""
        prefixes = [None if t is None else t.prefix for t in self._resolve(tasks)]
        return generate_ids(self.base, prefixes, input_ids, attention_mask, **kwargs)
