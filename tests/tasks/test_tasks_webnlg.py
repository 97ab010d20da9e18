"""WebNLG 2017 loading on the real data: linearisation, good-only training references, seen/unseen."""

from __future__ import annotations

import re

import pytest

from prefixtune.tasks import TASKS, load_groups, resolve_data_dir, to_examples
from prefixtune.tasks.webnlg import linearize_webnlg, training_categories

DATA = resolve_data_dir()
UNSEEN = {"Artist", "Athlete", "CelestialBody", "MeanOfTransportation", "Politician"}


@pytest.fixture(scope="module")
def test():
    return load_groups("webnlg", "test", DATA)


def test_test_split_has_every_entry_in_xml_order(test):
    assert len(test) == 1862
    assert [g.meta["eid"] for g in test] == [f"Id{i}" for i in range(1, 1863)]
    raw = (DATA / "webnlg2017/test/testdata_with_lex.xml").read_text(encoding="utf-8")
    assert len(to_examples(test)) == raw.count("<lex ") == 4928


def test_seen_and_unseen_views(test):
    seen = load_groups("webnlg", "test_seen", DATA)
    unseen = load_groups("webnlg", "test_unseen", DATA)
    assert (len(seen), len(unseen)) == (971, 891)
    assert {g.meta["category"] for g in unseen} == UNSEEN
    assert seen == [g for g in test if g.meta["seen"]]
    assert unseen == [g for g in test if not g.meta["seen"]]


def test_seen_categories_are_derived_from_the_training_files(test):
    categories = training_categories(DATA)
    assert len(categories) == 10
    assert {g.meta["category"] for g in test} - categories == UNSEEN


def test_first_and_last_test_entries_match_the_raw_file(test):
    first, last = test[0], test[-1]
    assert first.source == "| Abilene_Regional_Airport : cityServed : Abilene,_Texas"
    assert first.references == (
        "Abilene, Texas is served by the Abilene regional airport.",
        "Abilene Regional Airport serves the city of Abilene in Texas.",
    )
    assert first.meta == {
        "category": "Airport",
        "eid": "Id1",
        "size": 1,
        "seen": True,
        "file": "testdata_with_lex.xml",
    }
    assert last.source == (
        "| Uruguay : leaderName : Raúl_Fernando_Sendic_Rodríguez | Alfredo_Zitarrosa : deathPlace : "
        "Montevideo | Montevideo : country : Uruguay | Montevideo : leaderName : "
        "Daniel_Martínez_(politician) | Uruguay : language : Spanish_language"
    )
    assert len(last.references) == 3 and last.references[2].startswith("Raúl Fernando Sendic")
    assert (last.meta["category"], last.meta["size"], last.meta["seen"]) == ("Artist", 5, False)


def test_linearisation_is_the_papers_and_keeps_triple_text():
    triples = (("Aarhus_Airport", "cityServed", '"Aarhus, Denmark"'), ("Aarhus", "leaderName", "Jacob"))
    assert linearize_webnlg(triples) == (
        '| Aarhus_Airport : cityServed : "Aarhus, Denmark" | Aarhus : leaderName : Jacob'
    )


def test_every_source_has_one_piece_per_triple(test):
    for group in test:
        assert group.source.startswith("| ")
        assert group.source.count(" | ") == group.meta["size"] - 1


def test_train_and_dev_keep_only_good_lexicalisations():
    train = load_groups("webnlg", "train", DATA)
    dev = load_groups("webnlg", "dev", DATA)
    # 6,940 / 872 entries; 5 / 1 of them have no lexicalisation marked good and are dropped.
    assert (len(train), len(dev)) == (6935, 871)
    # 18,102 / 2,268 texts, of which 77 / 10 are marked toFix.
    assert (len(to_examples(train)), len(to_examples(dev))) == (18025, 2258)
    references = {r for g in train for r in g.references}
    assert "Alan Shepard was born in New Hampshire (US(." not in references  # comment="toFix"
    assert "Aarhus Airport serves the city of Aarhus, Denmark." in references
    assert all(g.meta["seen"] for g in train + dev)


def test_train_order_is_sorted_files_then_file_order():
    train = load_groups("webnlg", "train", DATA)
    assert train[0].meta["file"] == "1triple_allSolutions_Airport_train_challenge.xml"
    assert train[0].source == '| Aarhus_Airport : cityServed : "Aarhus, Denmark"'
    assert train[-1].meta["file"] == "7triples_University_train_challenge.xml"
    sizes = [g.meta["size"] for g in train]
    assert sizes == sorted(sizes)


def test_a_user_xml_file_can_replace_a_split(tmp_path):
    file = tmp_path / "mine.xml"
    file.write_text(
        '<benchmark><entries><entry category="Artist" eid="Id7" size="2"><modifiedtripleset>'
        "<mtriple>A_B | genre | Jazz</mtriple><mtriple>A_B | birthPlace | C &amp; D</mtriple>"
        '</modifiedtripleset><lex comment="good" lid="Id1"> A B plays jazz. </lex>'
        '<lex comment="toFix" lid="Id2">bad</lex></entry></entries></benchmark>',
        encoding="utf-8",
    )
    (group,) = load_groups("webnlg", "test_unseen", DATA, path=str(file))
    assert group.source == "| A_B : genre : Jazz | A_B : birthPlace : C & D"
    assert group.references == ("A B plays jazz.", "bad")
    (trained,) = load_groups("webnlg", "train", DATA, path=str(file))
    assert trained.references == ("A B plays jazz.",)


def test_a_malformed_triple_names_file_and_entry(tmp_path):
    file = tmp_path / "broken.xml"
    file.write_text(
        '<benchmark><entries><entry category="X" eid="Id3" size="1"><modifiedtripleset>'
        "<mtriple>only | two</mtriple></modifiedtripleset></entry></entries></benchmark>",
        encoding="utf-8",
    )
    with pytest.raises(ValueError, match=re.escape(f"{file} entry Id3")):
        load_groups("webnlg", "test", DATA, path=str(file))


def test_spec():
    spec = TASKS["webnlg"]
    assert spec.splits == ("train", "dev", "test", "test_seen", "test_unseen")
    assert (spec.kind, spec.default_split_for_training) == ("data-to-text", "train")
