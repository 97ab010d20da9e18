"""E2E NLG Challenge (Novikova et al. 2017): restaurant meaning representations to text.

Sources are the MR strings exactly as in the CSV (``name[The Eagle], eatType[coffee shop], ...``), the
linearisation the paper used. Rows sharing an MR form one SourceGroup, as the official e2e-metrics
script groups them into multi-reference sets.
"""

from __future__ import annotations

import csv
import os
import pathlib

from .base import (MetricSet, SourceGroup, TaskSpec, TrainDefaults, existing_file, find_data_path, group_pairs,
                   official_scorer)

E2E_FILES = {"train": "e2e/devset.csv", "test": "e2e/testset_w_refs.csv"}

E2E_NOTE = (
    "E2E's official training set is not in the data folder: training uses the official dev set "
    "(devset.csv) as its pool and evaluation the official test set (testset_w_refs.csv)"
)

# The official e2e-metrics script (measure_scores.py, read_tsv) repairs these mis-encodings in every
# line of the reference file before scoring, in this order. The copies in the data folder are clean
# UTF-8 and contain none of them, but users' copies of other releases may, and references must be
# the ones the official script scores.
E2E_REPAIRS = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def repair_e2e_text(text: str) -> str:
    """Apply the official script's character repairs (see ``E2E_REPAIRS``)."""
    for broken, fixed in E2E_REPAIRS:
        text = text.replace(broken, fixed)
    return text


def _columns(header: list[str], path: pathlib.Path) -> tuple[int, int]:
    """Positions of the ``mr`` and ``ref`` columns (case-insensitive, as the official script allows)."""
    names = [name.strip().lower() for name in header]
    if "mr" not in names or "ref" not in names:
        raise ValueError(f"{path}: expected a header with columns 'mr' and 'ref', found {header}")
    return names.index("mr"), names.index("ref")


def read_e2e_csv(path: pathlib.Path) -> list[SourceGroup]:
    """Read an E2E CSV (``mr,ref``; quoted fields) into groups of unique MRs in first-appearance order.

    The csv module is used because MRs and references contain commas inside quotes. The repairs apply
    to MRs and references alike. References lose surrounding whitespace only (one dev reference ends
    with a space; the official tokenisers ignore it, a training target should not carry it). A UTF-8
    byte-order mark is dropped, as the official script does.
    """
    pairs: list[tuple[str, str]] = []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: the file is empty")
        mr_col, ref_col = _columns(header, path)
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} fields, found {len(row)}")
            reference = repair_e2e_text(row[ref_col]).strip()
            if not reference:
                raise ValueError(f"{path}:{reader.line_num}: empty reference")
            pairs.append((repair_e2e_text(row[mr_col]), reference))
    return group_pairs(pairs)


def load_e2e(split: str, data_dir: str | os.PathLike | None, path: str | None) -> list[SourceGroup]:
    """``path`` (a CSV in the same format) replaces the split's file from the data folder."""
    file = existing_file(path) if path else find_data_path(E2E_FILES[split], data_dir, "e2e")
    return read_e2e_csv(file)


score_e2e = official_scorer("e2e_scores", "BLEU, NIST, METEOR, ROUGE-L and CIDEr as the official e2e-metrics "
                            "script computes them.")


SPEC = TaskSpec(
    name="e2e",
    splits=("train", "test"),
    description="E2E NLG Challenge: restaurant meaning representations to text (MR as in the CSV)",
    note=E2E_NOTE,
    loader=load_e2e,
    defaults=TrainDefaults(lr=8e-5, epochs=5, batch_size=10, prefix_length=5),
    metrics=MetricSet(score_e2e, table_keys=("bleu", "nist", "meteor", "rouge_l", "cider")),
)
