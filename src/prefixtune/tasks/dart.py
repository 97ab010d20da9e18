"""DART v1.1.1 (Nan et al. 2021): open-domain triples to text.

Linearisation follows the paper's code (``LineByLineTriplesTextDataset`` and ``read_triples_files`` in
XiangLi1999/PrefixTuning): ``subj : rel : obj`` per triple joined by `` | ``, with the relation
lower-cased (``rela.lower()`` there; DART mixes ``TITLE``/``title``-style relation names), subject and
object kept as given.
"""

from __future__ import annotations

import json
import os
import pathlib

from .base import (MetricSet, SourceGroup, TaskSpec, TrainDefaults, existing_file, find_data_path, group_pairs,
                   official_scorer)
from .webnlg import read_benchmark_xml

DART_FILES = {"train": "dart/dart-v1.1.1-full-dev.json", "test": "dart/dart-v1.1.1-full-test.xml"}

DART_NOTE = (
    "DART's official train split is not in the data folder: training uses the official dev set "
    "(dart-v1.1.1-full-dev.json) as its pool and evaluation the official test set "
    "(dart-v1.1.1-full-test.xml)"
)


def linearize_dart(triples: tuple[tuple[str, str, str], ...]) -> str:
    """``subj : rel : obj`` per triple (relation lower-cased), joined by `` | ``."""
    return " | ".join(f"{s} : {r.lower()} : {o}" for s, r, o in triples)


def _json_item(item: object, where: str) -> tuple[str, list[str]]:
    """(source, non-empty annotation texts) of one JSON record, or a ValueError saying what is wrong."""
    try:
        triples = tuple((str(s), str(r), str(o)) for s, r, o in item["tripleset"])  # type: ignore[index]
        texts = [str(annotation["text"]).strip() for annotation in item["annotations"]]  # type: ignore[index]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{where}: expected {{'tripleset': [[s, r, o], ...], 'annotations': [{{'text': ...}}, ...]}} "
            f"({type(error).__name__}: {error})"
        ) from error
    return linearize_dart(triples), [text for text in texts if text]


def read_dart_json(path: pathlib.Path) -> list[SourceGroup]:
    """A DART JSON release file as groups of unique sources in first-appearance order.

    Records with the same triples (47 in the dev set) are merged into one group, as the paper's
    evaluation code did, so a low-data split cannot put one source on both sides.
    """
    with open(path, encoding="utf-8") as handle:
        records = json.load(handle)
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of DART records")
    pairs: list[tuple[str, str]] = []
    for index, record in enumerate(records):
        source, texts = _json_item(record, f"{path} record {index}")
        pairs.extend((source, text) for text in texts)
    return group_pairs(pairs)


def read_dart_xml(path: pathlib.Path) -> list[SourceGroup]:
    """A DART XML release file (WebNLG layout): one group per entry, in file order, since the
    official DART evaluation scores outputs entry by entry. Every non-empty lexicalisation is a
    reference; its ``comment`` (the annotation's origin, e.g. "webnlg", "e2e") goes to meta."""
    return [
        SourceGroup(
            linearize_dart(entry.triples),
            tuple(text for text, _ in entry.lexes),
            {"eid": entry.eid, "category": entry.category, "origins": tuple(c for _, c in entry.lexes)},
        )
        for entry in read_benchmark_xml(path)
    ]


def load_dart(split: str, data_dir: str | os.PathLike | None, path: str | None) -> list[SourceGroup]:
    """``path`` replaces the split's file; ``.xml`` files are read as XML, anything else as JSON."""
    file = existing_file(path) if path else find_data_path(DART_FILES[split], data_dir, "dart")
    return read_dart_xml(file) if file.suffix.lower() == ".xml" else read_dart_json(file)


score_dart = official_scorer("dart_scores", "BLEU, METEOR and TER as DART's run_eval_on_dart.sh computes them.")


SPEC = TaskSpec(
    name="dart",
    splits=("train", "test"),
    description="DART v1.1.1: open-domain triples to text ('subj : rel : obj' joined by ' | ')",
    note=DART_NOTE,
    loader=load_dart,
    defaults=TrainDefaults(lr=5e-5, epochs=10, batch_size=5, prefix_length=10),
    metrics=MetricSet(score_dart, table_keys=("bleu", "meteor", "ter")),
)
