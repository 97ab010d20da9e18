"""Tasks: reading the benchmark corpora and users' files into linearised, reference-grouped data.

``load_groups`` gives evaluation's unit (one source, all its references); ``to_examples`` turns groups
into training pairs; ``low_data_split`` draws the paper's low-data subsets. Each task is a ``TaskSpec``
in ``TASKS``; adding one means writing a loader and registering its spec here.
"""

from __future__ import annotations

import os

from . import dart, e2e, jsonl, webnlg
from .base import (
    DataNotFoundError,
    Example,
    SourceGroup,
    TaskSpec,
    low_data_split,
    resolve_data_dir,
    to_examples,
)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in (e2e.SPEC, webnlg.SPEC, dart.SPEC, jsonl.JSONL_SPEC, jsonl.SUMMARIZATION_SPEC)
}


def load_groups(
    task: str, split: str, data_dir: str | os.PathLike | None = None, *, path: str | None = None
) -> list[SourceGroup]:
    """The groups of ``task``'s ``split``, read from the data folder (see ``resolve_data_dir``) or,
    when ``path`` is given, from that file (required for the ``jsonl`` and ``summarization`` tasks).

    Unknown tasks and splits are refused here, with the valid choices, before any file is touched.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    spec = TASKS[task]
    if split not in spec.splits:
        raise ValueError(f"unknown split {split!r} for task {task!r}; its splits: {', '.join(spec.splits)}")
    return spec.loader(split, data_dir, path)


__all__ = [
    "TASKS",
    "DataNotFoundError",
    "Example",
    "SourceGroup",
    "TaskSpec",
    "load_groups",
    "low_data_split",
    "resolve_data_dir",
    "to_examples",
]
