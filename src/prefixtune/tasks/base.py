"""Types and helpers shared by every task: the ``TaskSpec`` a task file fills in, and the data helpers.

A ``TaskSpec`` is everything the package knows about a task: its loader, its training recipe
(``TrainDefaults``), its metrics (``MetricSet``) and its help line. The loaders differ only in how they
read a file and how they linearise a structured input; everything else (where the data lives, how rows
with the same source become one multi-reference group, how a low-data training set is drawn) is decided
here once, so that E2E, WebNLG, DART and users' own files behave the same way.
"""

from __future__ import annotations

import os
import pathlib
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

DATA_ENV_VAR = "PREFIXTUNE_DATA"

DATA_URLS = {
    "e2e": "https://github.com/tuetschek/e2e-dataset",
    "webnlg": "https://gitlab.com/shimorina/webnlg-dataset (WebNLG challenge 2017)",
    "dart": "https://github.com/Yale-LILY/dart",
}


@dataclass(frozen=True)
class Example:
    """One training pair: a linearised input and one reference text for it."""

    source: str
    target: str


@dataclass(frozen=True)
class SourceGroup:
    """One unique source with all of its references, the unit that multi-reference metrics score.

    ``meta`` carries what evaluation needs besides the text (WebNLG's category and seen/unseen flag);
    it takes no part in hashing, so groups stay usable as dict keys.
    """

    source: str
    references: tuple[str, ...]
    meta: dict = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # A list passed by a caller would make the frozen object mutable through the back door.
        object.__setattr__(self, "references", tuple(self.references))


Loader = Callable[[str, str | os.PathLike | None, str | None], list[SourceGroup]]
Scorer = Callable[[Sequence[str], Sequence[SourceGroup]], dict]


@dataclass(frozen=True)
class TrainDefaults:
    """A task's training recipe (for the benchmarks, the hyperparameters Li & Liang 2021 report): what
    ``train`` uses for each option that a TrainConfig leaves as None."""

    lr: float
    """Peak AdamW learning rate."""
    epochs: int
    """Passes over the training set."""
    batch_size: int
    """Pairs per optimizer step."""
    prefix_length: int
    """Prefix length L."""


def low_data_recipe(defaults: TrainDefaults) -> TrainDefaults:
    """The paper's low-data setting (E2E, 50-500 pairs): lr 5e-5 and batch 10; epochs and L stay the task's."""
    return replace(defaults, lr=5e-5, batch_size=10)


def official_scorer(name: str, doc: str) -> Scorer:
    """A Scorer calling ``metrics.<name>(predictions, reference lists)``, described by ``doc``. The metrics
    package is imported when scoring, not here: loading data never needs the scorers' packages."""

    def score(predictions: list[str], groups: list[SourceGroup]) -> dict:
        from .. import metrics

        return getattr(metrics, name)(predictions, reference_lists(groups))

    score.__doc__, score.__name__ = doc, f"score_{name}"
    return score


@dataclass(frozen=True)
class MetricSet:
    """How a task is scored and shown."""

    score: Scorer
    """``score(predictions, groups)``: the official scores of one prediction per group, in order."""
    table_keys: tuple[str, ...]
    """The scores a table shows, in this order."""
    table_rows: tuple[str, ...] = ()
    """For nested scores (WebNLG's seen/unseen/all): the sub-dicts shown as one row each; empty: one row."""

    def format_table(self, scores: dict) -> str:
        """A plain-text table: a header of ``table_keys``, then one row (or one per ``table_rows``)."""
        keys = "".join(f"{key:>10}" for key in self.table_keys)
        if not self.table_rows:
            return keys + "\n" + "".join(_cell(scores.get(key)) for key in self.table_keys)
        lines = [f"{'split':8}" + keys]
        for row in self.table_rows:
            lines.append(f"{row:8}" + "".join(_cell(scores[row].get(key)) for key in self.table_keys))
        return "\n".join(lines)


def _cell(value: float | None) -> str:
    """One right-aligned table cell; ``n/a`` where a metric could not run (METEOR without Java)."""
    return f"{'n/a':>10}" if value is None else f"{value:>10.4f}" if abs(value) < 10 else f"{value:>10.2f}"


def reference_lists(groups: Sequence[SourceGroup]) -> list[list[str]]:
    """The references of each group, the form every metric in ``prefixtune.metrics`` takes."""
    return [list(group.references) for group in groups]


@dataclass(frozen=True)
class TaskSpec:
    """Registry entry of a task: everything the package knows about it, in one place.

    ``loader(split, data_dir, path)`` is only ever called with a split from ``splits``. ``description``
    is the task's one-line help, shown by the CLI's ``--task``.
    """

    name: str
    splits: tuple[str, ...]
    description: str
    note: str
    loader: Loader = field(repr=False, compare=False)
    defaults: TrainDefaults
    """The training recipe for the full training set."""
    metrics: MetricSet = field(repr=False, compare=False)
    """How outputs for this task are scored and tabled."""
    kind: str = "data-to-text"
    """"data-to-text" or "summarization"."""
    default_split_for_training: str = "train"

    def __post_init__(self) -> None:
        if "\n" in self.description:
            raise ValueError(f"task {self.name!r}: description must be one line (it is the CLI help), "
                             f"got {self.description!r}")

    def train_defaults(self, low_data: bool) -> TrainDefaults:
        """The recipe for a run on the full training set, or (``low_data``: TrainConfig.train_size set) on
        a drawn subset, where the paper's low-data setting replaces lr and batch size."""
        return low_data_recipe(self.defaults) if low_data else self.defaults


class DataNotFoundError(FileNotFoundError):
    """A dataset (or the data folder) is missing; the message lists the paths tried and a download URL."""


def repository_root() -> pathlib.Path | None:
    """The folder holding pyproject.toml above this file, or None for a non-editable install."""
    for parent in pathlib.Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file():
            return parent
    return None


def _candidate_roots(data_dir: str | os.PathLike | None) -> list[tuple[pathlib.Path, str]]:
    """Data roots to try, each with the reason it is tried.

    An explicit ``data_dir`` or ``$PREFIXTUNE_DATA`` is the only candidate when given: silently
    reading some other copy of the data than the one a user named would make results unreproducible.
    """
    if data_dir is not None:
        return [(pathlib.Path(data_dir).expanduser().absolute(), "data_dir argument")]
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return [(pathlib.Path(env).expanduser().absolute(), f"${DATA_ENV_VAR}")]
    found = [(pathlib.Path.cwd().parent / "shared" / "data", "../shared/data from the working directory")]
    repo = repository_root()
    if repo is not None:
        found.append((repo.parent / "shared" / "data", "../shared/data from the repository root"))
    unique: dict[pathlib.Path, str] = {}
    for path, why in found:
        unique.setdefault(path.resolve(), why)
    return list(unique.items())


def _searched(paths: Iterable[tuple[pathlib.Path, str]]) -> str:
    """One line per path tried, with why, so a user sees which copy of the data was expected."""
    return "\n".join(f"  - {path} ({why})" for path, why in paths)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The data root: ``data_dir``, else ``$PREFIXTUNE_DATA``, else ``../shared/data`` from the working
    directory, else ``../shared/data`` from the repository root; the first folder that exists."""
    candidates = _candidate_roots(data_dir)
    for path, _ in candidates:
        if path.is_dir():
            return path
    urls = "\n".join(f"  {name}: {url}" for name, url in DATA_URLS.items())
    raise DataNotFoundError(
        f"no data folder found; searched:\n{_searched(candidates)}\n"
        f"Pass data_dir= or set ${DATA_ENV_VAR}. The corpora come from:\n{urls}"
    )


def find_data_path(relative: str, data_dir: str | os.PathLike | None, dataset: str) -> pathlib.Path:
    """``relative`` (a file or folder such as ``e2e/devset.csv``) under the first data root that has it."""
    candidates = _candidate_roots(data_dir)
    for root, _ in candidates:
        if (root / relative).exists():
            return root / relative
    tried = [(root / relative, why) for root, why in candidates]
    raise DataNotFoundError(
        f"{dataset} data not found: {relative} is missing; searched:\n{_searched(tried)}\n"
        f"Download it from {DATA_URLS[dataset]} and pass data_dir= (or set ${DATA_ENV_VAR}) "
        f"to the folder that holds {relative.split('/')[0]}/."
    )


def existing_file(path: str | os.PathLike) -> pathlib.Path:
    """A user-given file path, checked now so the error names it rather than failing deep in a parser."""
    result = pathlib.Path(path).expanduser()
    if not result.exists():
        raise FileNotFoundError(f"data file not found: {result} (from path={str(path)!r})")
    return result


def group_pairs(pairs: Iterable[tuple[str, str]]) -> list[SourceGroup]:
    """Merge (source, reference) pairs into groups: unique sources in order of first appearance, each
    with its references in input order. Multi-reference metrics need exactly this grouping, and
    sources repeated non-consecutively (common in users' files) must still land in one group."""
    references: dict[str, list[str]] = {}
    for source, reference in pairs:
        references.setdefault(source, []).append(reference)
    return [SourceGroup(source, tuple(refs), {}) for source, refs in references.items()]


def to_examples(groups: Sequence[SourceGroup]) -> list[Example]:
    """One training Example per reference, groups and references kept in order."""
    return [Example(group.source, reference) for group in groups for reference in group.references]


def _dev_size(train_size: int, dev_fraction: float) -> int:
    """Validated dev size; never 0, since early stopping needs at least one dev example."""
    if train_size < 1:
        raise ValueError(f"train_size must be at least 1, got {train_size}")
    if dev_fraction < 0:
        raise ValueError(f"dev_fraction must not be negative, got {dev_fraction}")
    return max(1, round(dev_fraction * train_size))


def low_data_split(
    pool: list[Example] | list[SourceGroup], train_size: int, seed: int, dev_fraction: float = 0.3
) -> tuple[list[Example], list[Example]]:
    """Draw a low-data training set of ``train_size`` pairs and a disjoint dev set of
    ``max(1, round(dev_fraction * train_size))`` pairs, deterministically from ``seed``.

    The paper's low-data runs (E2E, 50-500 pairs, dev = 30% of the training size for early stopping)
    need such subsets; drawing them here makes every run name its subset by (size, seed).

    - A pool of Examples is sampled pair by pair (``random.Random(seed).sample``); pairs are disjoint
      by position, but a source may appear on both sides. Pass SourceGroups to prevent that.
    - A pool of SourceGroups is sampled by group: see ``_split_groups``; no source is on both sides.

    Errors: ValueError for ``train_size < 1``, a negative ``dev_fraction``, an empty pool or a pool
    with fewer pairs than requested (the message gives the numbers); TypeError for a mixed pool.
    """
    dev_size = _dev_size(train_size, dev_fraction)
    if not pool:
        raise ValueError("the pool is empty")
    groups = [item for item in pool if isinstance(item, SourceGroup)]
    examples = [item for item in pool if isinstance(item, Example)]
    if len(groups) != len(pool) and len(examples) != len(pool):
        raise TypeError("pool must be a list of Example or a list of SourceGroup, not a mix")
    available = sum(len(group.references) for group in groups) if groups else len(examples)
    needed = train_size + dev_size
    if needed > available:
        raise ValueError(
            f"pool too small: {train_size} train + {dev_size} dev = {needed} examples requested, "
            f"the pool has {available}"
        )
    rng = random.Random(seed)
    if groups:
        return _split_groups(groups, train_size, dev_size, rng)
    picked = [examples[i] for i in rng.sample(range(len(examples)), needed)]
    return picked[:train_size], picked[train_size:]


def _split_groups(
    groups: list[SourceGroup], train_size: int, dev_size: int, rng: random.Random
) -> tuple[list[Example], list[Example]]:
    """Group-level split. The rule, chosen so each side covers as many distinct sources as it can:

    1. Groups with the same source are merged, then shuffled.
    2. Train takes the first ``min(train_size, G - d)`` groups (G groups in all,
       ``d = min(dev_size, max(1, G * dev_size // (train_size + dev_size)))`` kept for dev), and more
       groups while their references number fewer than ``train_size`` (always leaving one for dev).
       Dev then takes the next ``d`` groups (or as many as are left), and more while its references
       number fewer than ``dev_size``. With G >= train_size + dev_size every pair has its own source.
    3. Each side shuffles the references inside each of its groups and takes them round-robin: one
       reference from every group, then a second from every group that has one, ... until it has its
       number of pairs. A pool that only just holds enough references can still fall short on one
       side for some seeds; that is reported as a ValueError with the numbers.
    """
    merged = group_pairs((group.source, ref) for group in groups for ref in group.references)
    rng.shuffle(merged)
    total = train_size + dev_size
    n_dev = min(dev_size, max(1, len(merged) * dev_size // total))
    n_train = min(train_size, len(merged) - n_dev)
    if n_train < 1:
        raise ValueError(
            f"pool too small: a disjoint train/dev split needs at least 2 distinct sources, "
            f"the pool has {len(merged)}"
        )
    n_train = _groups_needed(merged, n_train, train_size, len(merged) - 1)
    rest = merged[n_train:]
    n_dev = _groups_needed(rest, min(n_dev, len(rest)), dev_size, len(rest))
    train = _round_robin(merged[:n_train], train_size, rng, "train")
    dev = _round_robin(rest[:n_dev], dev_size, rng, "dev")
    return train, dev


def _groups_needed(groups: list[SourceGroup], at_least: int, pairs: int, limit: int) -> int:
    """How many leading groups a side takes: ``at_least``, then more (up to ``limit``) until their
    references number ``pairs``."""
    count = at_least
    available = sum(len(group.references) for group in groups[:count])
    while available < pairs and count < limit:
        available += len(groups[count].references)
        count += 1
    return count


def _round_robin(groups: list[SourceGroup], wanted: int, rng: random.Random, side: str) -> list[Example]:
    """``wanted`` pairs taken one reference per group per round (references shuffled within a group)."""
    shuffled = [rng.sample(group.references, len(group.references)) for group in groups]
    available = sum(len(refs) for refs in shuffled)
    if available < wanted:
        raise ValueError(
            f"pool too small: the {side} side needs {wanted} pairs but its {len(groups)} sources "
            f"(kept disjoint from the other side) have only {available} references"
        )
    picked: list[Example] = []
    depth = 0
    while len(picked) < wanted:
        for group, refs in zip(groups, shuffled, strict=True):
            if depth < len(refs) and len(picked) < wanted:
                picked.append(Example(group.source, refs[depth]))
        depth += 1
    return picked
