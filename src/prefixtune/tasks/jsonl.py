"""Users' own data as JSON Lines: ``{"input": ..., "output": ...}`` (data-to-text) or
``{"document": ..., "summary": ...}`` (summarization).

The output may be one string or a list of strings (several references). Lines with the same input,
consecutive or not, form one group, in order of first appearance: multi-reference metrics need that,
and users rarely sort their files. Texts are kept exactly as written; the input is the source as is,
so the user decides its linearisation.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator

from .base import (MetricSet, SourceGroup, TaskSpec, TrainDefaults, existing_file, group_pairs,
                   official_scorer)
from .dart import score_dart

USER_SPLITS = ("train", "dev", "test")


def _references(value: object, key: str, where: str) -> list[str]:
    """The reference(s) of one line: a non-empty string or a non-empty list of them."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ValueError(f"{where}: '{key}' is an empty list")
    for item in values:
        if not isinstance(item, str):
            found = type(item).__name__
            raise ValueError(f"{where}: '{key}' must be a string or a list of strings, found {found}")
        if not item.strip():
            raise ValueError(f"{where}: empty '{key}'")
    return values  # type: ignore[return-value]


def _line_pairs(line: str, input_key: str, output_key: str, where: str) -> list[tuple[str, str]]:
    """(source, reference) pairs of one line, or a ValueError naming the problem."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error.msg})") from error
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(record).__name__}")
    for key in (input_key, output_key):
        if key not in record:
            raise ValueError(f"{where}: missing key '{key}' (expected keys '{input_key}' and '{output_key}')")
    source = record[input_key]
    if not isinstance(source, str):
        raise ValueError(f"{where}: '{input_key}' must be a string, found {type(source).__name__}")
    if not source.strip():
        raise ValueError(f"{where}: empty '{input_key}'")
    return [(source, reference) for reference in _references(record[output_key], output_key, where)]


def _pairs(path: pathlib.Path, input_key: str, output_key: str) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as handle:  # bytes: a decoding error can then name its line
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}, line {number}: not UTF-8 text (byte {raw[error.start]:#04x} at "
                                 f"byte offset {error.start} of the line); save the file as UTF-8") from None
            if line.strip():  # blank lines (a trailing newline, spacing) carry no record
                yield from _line_pairs(line, input_key, output_key, f"{path}, line {number}")


def read_jsonl(path: pathlib.Path, input_key: str, output_key: str) -> list[SourceGroup]:
    """Groups of a JSONL file whose records map ``input_key`` to a source and ``output_key`` to
    its reference(s)."""
    return group_pairs(_pairs(path, input_key, output_key))


def _loader(task: str, input_key: str, output_key: str):
    """A TaskSpec loader for one JSONL flavour; both flavours differ only in their keys."""

    def load(split: str, data_dir: str | os.PathLike | None, path: str | None) -> list[SourceGroup]:
        if path is None:
            raise ValueError(
                f"task {task!r} reads your own file: pass path= to a JSONL file with lines like "
                f'{{"{input_key}": "...", "{output_key}": "..." or ["...", ...]}} (data_dir is not used)'
            )
        return read_jsonl(existing_file(path), input_key, output_key)

    return load


score_rouge = official_scorer("rouge_scores", "ROUGE-1/2/L F-measure (rouge-score, stemming), each prediction "
                              "against its best reference.")


JSONL_SPEC = TaskSpec(
    name="jsonl",
    splits=USER_SPLITS,
    description='your own data-to-text pairs: JSONL lines {"input": str, "output": str | list[str]}',
    note="needs path= to your file; the split name only labels it",
    loader=_loader("jsonl", "input", "output"),
    # The table-to-text recipe at the paper's usual L; BLEU/METEOR/TER as for DART, the open-domain set.
    defaults=TrainDefaults(lr=5e-5, epochs=5, batch_size=10, prefix_length=10),
    metrics=MetricSet(score_dart, table_keys=("bleu", "meteor", "ter")),
)

SUMMARIZATION_SPEC = TaskSpec(
    name="summarization",
    splits=USER_SPLITS,
    description='your own summarization data: JSONL lines {"document": str, "summary": str | list[str]}',
    kind="summarization",
    note="needs path= to your file; the split name only labels it",
    loader=_loader("summarization", "document", "summary"),
    defaults=TrainDefaults(lr=5e-5, epochs=30, batch_size=14, prefix_length=100),  # the paper's XSUM recipe
    metrics=MetricSet(score_rouge, table_keys=("rouge1", "rouge2", "rougeL")),
)
