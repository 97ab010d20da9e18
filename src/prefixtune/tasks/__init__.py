"""Tasks: what each dataset is, and reading it into linearised, reference-grouped data.

Each task is one ``TaskSpec`` in ``TASKS``, and the rest of the package reads everything task-specific
from it: its loader (``load_groups``), its training recipe (``train.resolve``), its metrics and table
(``evaluate.score``, ``evaluate.format_table``) and its help line (the CLI's ``--task``). Adding a dataset
is one file here that defines its ``TaskSpec``, its entry in ``TASKS`` below, and its tests in
``tests/tasks/``.

``load_groups`` gives evaluation's unit (one source, all its references); ``to_examples`` turns groups
into training pairs; ``low_data_split`` draws the paper's low-data subsets.
"""

from __future__ import annotations

import os

from . import dart, e2e, jsonl, webnlg
from .base import (
    DataNotFoundError,
    Example,
    MetricSet,
    SourceGroup,
    TaskSpec,
    TrainDefaults,
    low_data_split,
    resolve_data_dir,
    to_examples,
)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in (e2e.SPEC, webnlg.SPEC, dart.SPEC, jsonl.JSONL_SPEC, jsonl.SUMMARIZATION_SPEC)
}


def get_task(name: str) -> TaskSpec:
    """The registered spec called ``name``; a ValueError naming the known tasks for any other name, so that
    no caller falls back to some other task's loader, recipe or metrics."""
    spec = TASKS.get(name)
    if spec is None:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return spec


def task_help() -> dict[str, str]:
    """Each registered task's name and one-line help (its ``description``), as the CLI's --task lists them."""
    return {name: spec.description for name, spec in TASKS.items()}


def load_groups(
    task: str, split: str, data_dir: str | os.PathLike | None = None, *, path: str | None = None
) -> list[SourceGroup]:
    """The groups of ``task``'s ``split``, read from the data folder (see ``resolve_data_dir``) or,
    when ``path`` is given, from that file (required for the ``jsonl`` and ``summarization`` tasks).

    Unknown tasks and splits are refused here, with the valid choices, before any file is touched.
    """
    spec = get_task(task)
    if split not in spec.splits:
        raise ValueError(f"unknown split {split!r} for task {task!r}; its splits: {', '.join(spec.splits)}")
    return spec.loader(split, data_dir, path)


__all__ = [
    "TASKS",
    "DataNotFoundError",
    "Example",
    "MetricSet",
    "SourceGroup",
    "TaskSpec",
    "TrainDefaults",
    "get_task",
    "load_groups",
    "task_help",
    "low_data_split",
    "resolve_data_dir",
    "to_examples",
]
