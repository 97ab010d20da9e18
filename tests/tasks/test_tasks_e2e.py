"""E2E loading on the real data: counts, grouping, order and the official script's repairs."""

from __future__ import annotations

import csv

import pytest

from prefixtune.tasks import TASKS, load_groups, resolve_data_dir, to_examples
from prefixtune.tasks.e2e import repair_e2e_text

DATA = resolve_data_dir()
WILDWOOD = (
    "name[Wildwood], eatType[coffee shop], food[English], priceRange[moderate], "
    "customer rating[3 out of 5], near[Ranch]"
)


def _raw_rows(name: str) -> list[tuple[str, str]]:
    with open(DATA / "e2e" / name, encoding="utf-8", newline="") as handle:
        return [(row["mr"], row["ref"]) for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def train():
    return load_groups("e2e", "train", DATA)


@pytest.fixture(scope="module")
def test():
    return load_groups("e2e", "test", DATA)


def test_counts_match_the_official_files(train, test):
    assert len(train) == 547 and len(to_examples(train)) == 4672
    assert len(test) == 630 and len(to_examples(test)) == 4693


def test_first_and_last_groups_match_the_raw_dev_file(train):
    first = train[0]
    assert first.source == "name[Alimentum], area[city centre], familyFriendly[no]"
    assert first.references[0] == (
        "There is a place in the city centre, Alimentum, that is not family-friendly."
    )
    assert len(first.references) == 6 and first.meta == {}
    last = train[-1]
    assert last.source == WILDWOOD and len(last.references) == 9
    assert last.references[-3:] == (
        "A coffee shop called Wildwood is medium-priced offering meals with a three star rating. "
        "It is located near Ranch.",
        "Wildwood is a coffee shop with moderately priced English food near Ranch that has  a 3 out "
        "of 5 customer rating",
        "Wildwood is a moderately priced English coffee shop located near the Ranch. It has been "
        "rated 3 out of 5.",
    )


def test_first_and_last_groups_match_the_raw_test_file(test):
    assert test[0].source == "name[Blue Spice], eatType[coffee shop], area[city centre]"
    assert test[0].references == (
        "A coffee shop in the city centre area called Blue Spice.",
        "Blue Spice is a coffee shop in city centre.",
    )
    assert test[-1].source == "name[Zizzi], eatType[pub], near[The Sorrento]"
    assert test[-1].references[-2:] == (
        "Close to The Sorrento you will be able to find a pub called Zizzi",
        "There is a pub  called Zizzi located near The Sorrento.",
    )


@pytest.mark.parametrize("split,name", [("train", "devset.csv"), ("test", "testset_w_refs.csv")])
def test_groups_are_unique_mrs_in_first_appearance_order_with_refs_in_file_order(split, name):
    rows = _raw_rows(name)
    expected: dict[str, list[str]] = {}
    for mr, ref in rows:
        expected.setdefault(mr, []).append(ref.strip())
    groups = load_groups("e2e", split, DATA)
    assert [g.source for g in groups] == list(expected)
    assert [list(g.references) for g in groups] == list(expected.values())


def test_only_surrounding_whitespace_of_references_is_removed(train):
    raw = [ref for _, ref in _raw_rows("devset.csv")]
    assert "The Eagle coffee shop, serving " in raw
    assert "The Eagle coffee shop, serving" in {ref for g in train for ref in g.references}


def test_repairs_are_the_official_ones_in_order():
    assert repair_e2e_text("Ł20 and Â£30, cafÃ© or cafã©") == "£20 and £30, café or café"
    assert repair_e2e_text("priceRange[more than £30]") == "priceRange[more than £30]"


def test_the_data_folder_copies_need_no_repair_and_keep_pound_and_e_acute(train, test):
    texts = [t for g in train + test for t in (g.source, *g.references)]
    assert not any(bad in t for t in texts for bad in ("Ł", "Â£", "Ã©", "ã©"))
    assert any("£" in t for t in texts) and any("é" in t for t in texts)


def test_repairs_apply_to_sources_and_references_of_a_user_file(tmp_path):
    file = tmp_path / "mine.csv"
    file.write_text(
        'mr,ref\n"name[Caf\u00c3\u00a9 X], priceRange[less than \u014120]","Caf\u00c3\u00a9 X costs '
        'under \u00c2\u00a320, a bargain."\n',
        encoding="utf-8",
    )
    (group,) = load_groups("e2e", "test", path=str(file))
    assert group.source == "name[Café X], priceRange[less than £20]"
    assert group.references == ("Café X costs under £20, a bargain.",)


def test_bad_user_csv_is_refused_with_file_and_line(tmp_path):
    file = tmp_path / "bad.csv"
    file.write_text('mr,ref\n"name[A]","fine"\n"name[B]","x","extra"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv:3: expected 2 fields, found 3"):
        load_groups("e2e", "train", path=str(file))
    file.write_text("meaning,text\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match="columns 'mr' and 'ref'"):
        load_groups("e2e", "train", path=str(file))


def test_spec_says_where_training_data_comes_from():
    spec = TASKS["e2e"]
    assert spec.splits == ("train", "test") and spec.kind == "data-to-text"
    assert spec.default_split_for_training == "train"
    assert spec.note == (
        "E2E's official training set is not in the data folder: training uses the official dev set "
        "(devset.csv) as its pool and evaluation the official test set (testset_w_refs.csv)"
    )
