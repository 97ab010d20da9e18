"""The registry and what each TaskSpec holds (recipe, metrics, help), data-folder resolution,
to_examples and low_data_split."""

from __future__ import annotations

import collections
import dataclasses

import pytest

from prefixtune import metrics
from prefixtune.tasks import (
    TASKS,
    DataNotFoundError,
    Example,
    MetricSet,
    SourceGroup,
    TrainDefaults,
    base,
    get_task,
    load_groups,
    low_data_split,
    resolve_data_dir,
    task_help,
    to_examples,
)

DATA = resolve_data_dir()


@pytest.fixture(scope="module")
def e2e_groups():
    return load_groups("e2e", "train", DATA)


def test_registry_lists_the_tasks():
    assert list(TASKS) == ["e2e", "webnlg", "dart", "jsonl", "summarization"]
    for name, spec in TASKS.items():
        assert spec.name == name and spec.default_split_for_training in spec.splits
        assert spec.kind in ("data-to-text", "summarization") and spec.description and spec.note


def test_unknown_task_lists_the_known_tasks():
    known = "known tasks: e2e, webnlg, dart, jsonl, summarization"
    with pytest.raises(ValueError, match=f"unknown task 'xsum'; {known}"):
        load_groups("xsum", "train")


@pytest.mark.parametrize("name", list(TASKS))
def test_every_task_has_a_recipe_a_metric_set_and_a_help_line(name):
    spec = TASKS[name]
    recipe = spec.defaults
    assert isinstance(recipe, TrainDefaults) and recipe.lr > 0
    assert min(recipe.epochs, recipe.batch_size, recipe.prefix_length) >= 1
    assert spec.train_defaults(low_data=False) == recipe
    assert spec.train_defaults(low_data=True) == TrainDefaults(5e-5, recipe.epochs, 10, recipe.prefix_length)
    assert isinstance(spec.metrics, MetricSet) and callable(spec.metrics.score) and spec.metrics.table_keys
    assert spec.description.strip() and "\n" not in spec.description
    assert task_help()[name] == spec.description


def test_the_paper_recipes():
    recipes = {name: tuple(vars(spec.defaults).values()) for name, spec in TASKS.items()}
    assert recipes == {"e2e": (8e-5, 5, 10, 5), "webnlg": (5e-5, 5, 5, 5), "dart": (5e-5, 10, 5, 10),
                       "jsonl": (5e-5, 5, 10, 10), "summarization": (5e-5, 30, 14, 100)}


def test_a_help_line_must_be_one_line():
    with pytest.raises(ValueError, match="description must be one line"):
        dataclasses.replace(TASKS["jsonl"], description="two\nlines")


def test_get_task_refuses_unknown_names_with_the_known_ones():
    assert get_task("dart") is TASKS["dart"]
    known = "known tasks: e2e, webnlg, dart, jsonl, summarization"
    with pytest.raises(ValueError, match=f"unknown task 'nonexistent'; {known}"):
        get_task("nonexistent")


#: The official metric function each task is scored with (a new task must say which).
METRIC_OF = {"e2e": "e2e_scores", "webnlg": "webnlg_scores", "dart": "dart_scores", "jsonl": "dart_scores",
             "summarization": "rouge_scores"}


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_scores_with_its_official_metric(name, monkeypatch):
    calls = []
    for function in set(METRIC_OF.values()):
        monkeypatch.setattr(metrics, function, lambda *args, function=function: calls.append((function, args)) or {})
    groups = [SourceGroup("s1", ("r1", "r2"), {"seen": True}), SourceGroup("s2", ("r3",), {})]
    assert TASKS[name].metrics.score(["p1", "p2"], groups) == {}
    extra = ([True, False],) if name == "webnlg" else ()  # WebNLG splits scores by seen/unseen category
    assert calls == [(METRIC_OF[name], (["p1", "p2"], [["r1", "r2"], ["r3"]], *extra))]


def test_summarization_table_shows_what_its_metric_returns():
    spec = TASKS["summarization"]
    scores = spec.metrics.score(["the cat sat"], [SourceGroup("doc", ("the cat sat",), {})])
    assert set(scores) == set(spec.metrics.table_keys) and scores["rouge1"] == pytest.approx(100.0)


def test_metric_set_tables_show_their_keys_in_order():
    one_row = MetricSet(lambda p, g: {}, table_keys=("b", "a"))
    assert one_row.format_table({"a": 1.0, "b": 25.0, "c": 3.0}) == f"{'b':>10}{'a':>10}\n{'25.00':>10}{'1.0000':>10}"
    assert one_row.format_table({"b": None}).split("\n")[1] == f"{'n/a':>10}" * 2
    per_split = MetricSet(lambda p, g: {}, table_keys=("bleu",), table_rows=("seen", "all"))
    table = per_split.format_table({"seen": {"bleu": 40.0}, "all": {"bleu": 30.0}, "unseen": {"bleu": 1.0}})
    assert table.split("\n") == [f"{'split':8}{'bleu':>10}", f"{'seen':8}{'40.00':>10}", f"{'all':8}{'30.00':>10}"]


def test_unknown_split_lists_the_tasks_splits():
    with pytest.raises(ValueError, match="unknown split 'dev' for task 'e2e'; its splits: train, test"):
        load_groups("e2e", "dev")
    with pytest.raises(ValueError, match="its splits: train, dev, test, test_seen, test_unseen"):
        load_groups("webnlg", "valid")


def test_explicit_data_dir_beats_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXTUNE_DATA", str(DATA))
    assert resolve_data_dir(tmp_path) == tmp_path


def test_environment_beats_the_default_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXTUNE_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path


def test_default_is_shared_data_next_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFIXTUNE_DATA", raising=False)
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    assert resolve_data_dir() == (tmp_path / "shared" / "data").resolve()


def test_then_shared_data_next_to_the_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFIXTUNE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    root = base.repository_root()
    assert root is not None and (root / "pyproject.toml").is_file()
    assert resolve_data_dir() == (root.parent / "shared" / "data").resolve()


def test_missing_data_folder_lists_what_was_searched(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError, match="data_dir argument") as caught:
        resolve_data_dir(missing)
    assert str(missing) in str(caught.value) and "github.com/Yale-LILY/dart" in str(caught.value)
    assert isinstance(caught.value, FileNotFoundError)
    monkeypatch.setenv("PREFIXTUNE_DATA", str(missing))
    with pytest.raises(DataNotFoundError, match=r"\$PREFIXTUNE_DATA"):
        resolve_data_dir()
    monkeypatch.delenv("PREFIXTUNE_DATA")
    monkeypatch.setattr(base, "repository_root", lambda: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFoundError, match="from the working directory"):
        resolve_data_dir()


@pytest.mark.parametrize(
    "task,split,relative,url",
    [
        ("e2e", "train", "e2e/devset.csv", "github.com/tuetschek/e2e-dataset"),
        ("e2e", "test", "e2e/testset_w_refs.csv", "github.com/tuetschek/e2e-dataset"),
        ("webnlg", "dev", "webnlg2017/dev", "gitlab.com/shimorina/webnlg-dataset"),
        ("webnlg", "test", "webnlg2017/test/testdata_with_lex.xml", "gitlab.com/shimorina/webnlg-dataset"),
        ("dart", "train", "dart/dart-v1.1.1-full-dev.json", "github.com/Yale-LILY/dart"),
        ("dart", "test", "dart/dart-v1.1.1-full-test.xml", "github.com/Yale-LILY/dart"),
    ],
)
def test_missing_dataset_names_the_path_and_where_to_get_it(tmp_path, task, split, relative, url):
    with pytest.raises(FileNotFoundError) as caught:
        load_groups(task, split, tmp_path)
    assert isinstance(caught.value, DataNotFoundError)
    assert str(tmp_path / relative) in str(caught.value) and url in str(caught.value)


def test_source_group_is_frozen_hashable_and_holds_a_tuple():
    group = SourceGroup("s", ["a", "b"], {"k": 1})  # type: ignore[arg-type]
    assert group.references == ("a", "b") and hash(group) == hash(SourceGroup("s", ("a", "b"), {}))
    with pytest.raises(AttributeError):
        group.source = "t"  # type: ignore[misc]


def test_to_examples_keeps_group_and_reference_order():
    groups = [SourceGroup("x", ("1", "2"), {}), SourceGroup("y", ("3",), {})]
    assert to_examples(groups) == [Example("x", "1"), Example("x", "2"), Example("y", "3")]


@pytest.mark.parametrize("size", [50, 100, 200, 500])
def test_group_split_sizes_determinism_and_disjoint_sources(e2e_groups, size):
    train, dev = low_data_split(e2e_groups, size, seed=3)
    assert (len(train), len(dev)) == (size, round(0.3 * size))
    assert not {e.source for e in train} & {e.source for e in dev}
    assert (train, dev) == low_data_split(e2e_groups, size, seed=3)
    assert (train, dev) != low_data_split(e2e_groups, size, seed=4)
    pool = collections.Counter(to_examples(e2e_groups))
    assert not collections.Counter(train + dev) - pool
    if size <= 200:  # enough MRs for one reference per source on both sides
        assert len({e.source for e in train}) == size and len({e.source for e in dev}) == len(dev)


def test_groups_with_the_same_source_are_kept_on_one_side():
    pool = [
        SourceGroup("a", ("1", "2"), {}),
        SourceGroup("b", ("3", "4"), {}),
        SourceGroup("a", ("5",), {}),
        SourceGroup("c", ("6",), {}),
    ]
    for seed in range(20):
        train, dev = low_data_split(pool, 2, seed=seed, dev_fraction=0.5)
        assert len(train) == 2 and len(dev) == 1
        assert not {e.source for e in train} & {e.source for e in dev}


def test_example_split_is_deterministic_and_disjoint(e2e_groups):
    pool = to_examples(e2e_groups)
    train, dev = low_data_split(pool, 100, seed=0, dev_fraction=0.2)
    assert (len(train), len(dev)) == (100, 20)
    assert (train, dev) == low_data_split(pool, 100, seed=0, dev_fraction=0.2)
    assert not collections.Counter(train + dev) - collections.Counter(pool)


def test_dev_set_has_at_least_one_example():
    pool = [Example(str(i), "t") for i in range(5)]
    assert [len(side) for side in low_data_split(pool, 1, seed=0)] == [1, 1]
    assert [len(side) for side in low_data_split(pool, 2, seed=0, dev_fraction=0.0)] == [2, 1]


def test_split_errors_give_the_numbers(e2e_groups):
    examples = to_examples(e2e_groups)
    with pytest.raises(ValueError, match="train_size must be at least 1, got 0"):
        low_data_split(examples, 0, seed=0)
    too_many = r"4000 train \+ 1200 dev = 5200 examples requested, the pool has 4672"
    with pytest.raises(ValueError, match=too_many):
        low_data_split(examples, 4000, seed=0)
    with pytest.raises(ValueError, match=too_many):
        low_data_split(e2e_groups, 4000, seed=0)
    tight = [SourceGroup("a", ("1", "2"), {}), SourceGroup("b", ("3",), {})]
    outcomes = set()
    for seed in range(10):  # 3 pairs from 3: works only when "a" goes to train (the documented limit)
        try:
            train, dev = low_data_split(tight, 2, seed=seed, dev_fraction=0.5)
            outcomes.add((train[0].source, dev[0].source))
        except ValueError as error:
            assert "the train side needs 2 pairs but its 1 sources" in str(error)
            outcomes.add("refused")
    assert outcomes == {("a", "b"), "refused"}
    with pytest.raises(ValueError, match="the pool is empty"):
        low_data_split([], 5, seed=0)
    with pytest.raises(ValueError, match="at least 2 distinct sources, the pool has 1"):
        low_data_split([SourceGroup("a", ("1", "2", "3"), {})], 1, seed=0)
    with pytest.raises(ValueError, match="dev_fraction must not be negative"):
        low_data_split(examples, 5, seed=0, dev_fraction=-0.1)
    with pytest.raises(TypeError, match="not a mix"):
        low_data_split([examples[0], e2e_groups[0]], 1, seed=0)  # type: ignore[list-item]
