"""WebNLG challenge 2017 (Gardent et al.): DBpedia triples to text.

Linearisation follows the paper's code (``LineByLineWebNLGTextDataset`` in XiangLi1999/PrefixTuning):
every modified triple ``subj | property | obj`` becomes `` | subj : property : obj`` and the pieces are
concatenated; the result here is stripped, so a source reads
``| Aarhus_Airport : cityServed : "Aarhus, Denmark"`` (the space the paper put before the source
belongs to the prompt template, not the task). Triple texts stay as in the XML: that code read
the JSON release, whose subjects/objects keep DBpedia's underscores, and it did not replace them.

The XML reader here is the one parser of the WebNLG layout in the package; DART's test file uses it.
"""

from __future__ import annotations

import functools
import os
import pathlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from .base import MetricSet, SourceGroup, TaskSpec, TrainDefaults, existing_file, find_data_path, reference_lists

WEBNLG_SPLIT_PATHS = {
    "train": "webnlg2017/train",
    "dev": "webnlg2017/dev",
    "test": "webnlg2017/test/testdata_with_lex.xml",
}


@dataclass(frozen=True)
class BenchmarkEntry:
    """One ``<entry>`` of a WebNLG-layout XML file, before any task-specific linearisation."""

    category: str
    eid: str
    size: int
    triples: tuple[tuple[str, str, str], ...]
    lexes: tuple[tuple[str, str], ...]  # (text, comment); empty texts dropped
    file: str  # file name, since eids restart at Id1 in every training file


def _triple(text: str, where: str) -> tuple[str, str, str]:
    """``subject | property | object`` split on the separator; anything else is a corrupt file."""
    parts = [part.strip() for part in text.split(" | ")]
    if len(parts) != 3:
        raise ValueError(f"{where}: expected 'subject | property | object', found {text!r}")
    return parts[0], parts[1], parts[2]


def _entry(element: ET.Element, file: pathlib.Path) -> BenchmarkEntry:
    """One ``<entry>``: the modified triples (the ones the paper linearised) and the lexicalisations."""
    eid = element.get("eid", "")
    where = f"{file} entry {eid}"
    triples = tuple(_triple(node.text or "", where) for node in element.findall("modifiedtripleset/mtriple"))
    lexes = []
    for lex in element.findall("lex"):
        text = "".join(lex.itertext()).strip()
        if text:  # DART's test file has an empty <lex/>; it cannot serve as a reference
            lexes.append((text, lex.get("comment", "")))
    return BenchmarkEntry(
        category=element.get("category", ""),
        eid=eid,
        size=int(element.get("size", len(triples))),
        triples=triples,
        lexes=tuple(lexes),
        file=file.name,
    )


@functools.lru_cache(maxsize=256)
def _parse_cached(path: str, mtime_ns: int, size: int) -> tuple[BenchmarkEntry, ...]:
    """Parse one file; ``mtime_ns`` and ``size`` only key the cache so an edited file is re-read."""
    file = pathlib.Path(path)
    root = ET.parse(file).getroot()
    return tuple(_entry(element, file) for element in root.iter("entry"))


def read_benchmark_xml(path: pathlib.Path) -> tuple[BenchmarkEntry, ...]:
    """All entries of one WebNLG-layout XML file, in file order.

    Cached per (path, modification time, size): seen/unseen needs the training categories on every
    test load, and the entries are immutable, so re-reading unchanged files would only cost time.
    """
    stat = path.stat()
    return _parse_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


def _xml_files(location: pathlib.Path) -> list[pathlib.Path]:
    """A file itself, or every ``*.xml`` below a folder in sorted path order (a stable split order)."""
    if location.is_dir():
        return sorted(location.rglob("*.xml"))
    return [location]


def linearize_webnlg(triples: tuple[tuple[str, str, str], ...]) -> str:
    """`` | s : p : o`` per triple, concatenated and stripped (see the module docstring)."""
    return "".join(f" | {s} : {p} : {o}" for s, p, o in triples).strip()


def training_categories(data_dir: str | os.PathLike | None) -> frozenset[str]:
    """Categories of the training split: the "seen" ones. Derived from the files rather than
    hard-coded so a user's own WebNLG-style release gets its own seen/unseen split."""
    folder = find_data_path(WEBNLG_SPLIT_PATHS["train"], data_dir, "webnlg")
    return frozenset(entry.category for file in _xml_files(folder) for entry in read_benchmark_xml(file))


def _group(entry: BenchmarkEntry, good_only: bool, seen: frozenset[str]) -> SourceGroup:
    references = tuple(text for text, comment in entry.lexes if comment == "good" or not good_only)
    meta = {
        "category": entry.category,
        "eid": entry.eid,
        "size": entry.size,
        "seen": entry.category in seen,
        "file": entry.file,
    }
    return SourceGroup(linearize_webnlg(entry.triples), references, meta)


def load_webnlg(split: str, data_dir: str | os.PathLike | None, path: str | None) -> list[SourceGroup]:
    """One group per entry, in file order (test: the order of testdata_with_lex.xml, which the
    challenge's evaluation expects; train/dev: files in sorted path order).

    - train/dev keep only lexicalisations marked comment="good" (the paper trained on those);
      entries left without any (5 in train, 1 in dev) are dropped.
    - test keeps every lexicalisation and every entry (even one without a reference, as in
      testdata_no_lex.xml), so outputs stay aligned with the XML; test_seen/test_unseen are the
      entries whose category is/is not among the training categories.
    - ``path`` (an XML file or a folder of them) replaces the split's data; seen/unseen is still
      judged against the training split in the data folder.
    """
    base_split = "test" if split.startswith("test") else split
    if path:
        location = existing_file(path)
    else:
        location = find_data_path(WEBNLG_SPLIT_PATHS[base_split], data_dir, "webnlg")
    seen = training_categories(data_dir)
    good_only = base_split != "test"
    groups = [
        _group(entry, good_only, seen) for file in _xml_files(location) for entry in read_benchmark_xml(file)
    ]
    if good_only:
        groups = [group for group in groups if group.references]
    if split == "test_seen":
        return [group for group in groups if group.meta["seen"]]
    if split == "test_unseen":
        return [group for group in groups if not group.meta["seen"]]
    return groups


def score_webnlg(predictions: list[str], groups: list[SourceGroup]) -> dict:
    """The challenge's BLEU, METEOR and TER on the seen, unseen and all entries (``meta["seen"]``; groups
    without it, such as a references file's, count as unseen)."""
    from .. import metrics  # imported when scoring: loading data never needs the scorers' packages

    seen = [bool(group.meta.get("seen")) for group in groups]
    return metrics.webnlg_scores(predictions, reference_lists(groups), seen)


SPEC = TaskSpec(
    name="webnlg",
    splits=("train", "dev", "test", "test_seen", "test_unseen"),
    description="WebNLG challenge 2017: DBpedia triples to text (' | subj : property : obj' per triple)",
    note=(
        "test_seen/test_unseen are the test entries whose category is/is not among the 10 training "
        "categories; train/dev references are the lexicalisations marked 'good' only"
    ),
    loader=load_webnlg,
    defaults=TrainDefaults(lr=5e-5, epochs=5, batch_size=5, prefix_length=5),
    metrics=MetricSet(score_webnlg, table_keys=("bleu", "meteor", "ter"), table_rows=("seen", "unseen", "all")),
)
