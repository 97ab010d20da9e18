"""Registry errors, data-folder resolution, to_examples and low_data_split."""

from __future__ import annotations

import collections

import pytest

from prefixtune.tasks import (
    TASKS,
    DataNotFoundError,
    Example,
    SourceGroup,
    base,
    load_groups,
    low_data_split,
    resolve_data_dir,
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
