"""DART loading on the real data: JSON pool, XML test through the WebNLG parser, linearisation."""

from __future__ import annotations

import json

import pytest

from prefixtune.tasks import TASKS, dart, load_groups, resolve_data_dir, to_examples, webnlg

DATA = resolve_data_dir()


@pytest.fixture(scope="module")
def train():
    return load_groups("dart", "train", DATA)


@pytest.fixture(scope="module")
def test():
    return load_groups("dart", "test", DATA)


def test_train_pool_is_the_dev_json_grouped_by_source(train):
    records = json.loads((DATA / "dart/dart-v1.1.1-full-dev.json").read_text(encoding="utf-8"))
    assert len(records) == 2768
    assert len(train) == 2721  # 47 records repeat an earlier record's triples
    assert len(to_examples(train)) == sum(len(r["annotations"]) for r in records) == 6980
    assert len({g.source for g in train}) == len(train)


def test_first_and_last_train_groups_match_the_raw_file(train):
    assert train[0].source == (
        "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina"
    )
    assert train[0].references == ("A school from Mars Hill, North Carolina, joined in 1973.",)
    assert train[-1].source == (
        "Wildwood : eattype : coffee shop | Wildwood : pricerange : moderate | Wildwood : near : Ranch"
    )
    assert train[-1].references[-1] == "The Wildwood is an affordable coffee shop located in Ranch."


def test_test_split_is_every_xml_entry_in_order(test):
    raw = (DATA / "dart/dart-v1.1.1-full-test.xml").read_text(encoding="utf-8")
    assert len(test) == raw.count("<entry ") == 5097
    # every <lex> but the one empty <lex .../> of entry Id116
    assert len(to_examples(test)) == raw.count("<lex ") - 1 == 12551
    assert test[0].source == (
        "Hawaii Five-O : notes : Episode: The Flight of the Jewels | [TABLECONTEXT] : [title] : "
        "Jeff Daniels | [TABLECONTEXT] : title : Hawaii Five-O"
    )
    assert test[0].meta == {"eid": "Id1", "category": "MISC", "origins": ("WikiTableQuestions_lily",)}
    assert test[-1].source == "Zizzi : eattype : pub | Zizzi : near : The Sorrento"
    assert test[-1].references == (
        "Close to The Sorrento you will be able to find a pub called Zizzi",
        "There is a pub  called Zizzi located near The Sorrento.",
    )


def test_empty_lexicalisation_is_not_a_reference(test):
    (entry,) = [g for g in test if g.meta["eid"] == "Id116"]
    assert entry.references == ("reserved (previously G721) has 1 channel and 8000 Hz clock rate",)


def test_linearisation_lowercases_relations_only():
    triples = (("Mars Hill College", "JOINED", "1973"), ("A", "eatType", "Coffee Shop"))
    assert dart.linearize_dart(triples) == "Mars Hill College : joined : 1973 | A : eattype : Coffee Shop"


def test_xml_is_read_by_the_webnlg_parser():
    assert dart.read_benchmark_xml is webnlg.read_benchmark_xml


def test_malformed_json_record_is_named(tmp_path):
    file = tmp_path / "mine.json"
    file.write_text('[{"tripleset": [["a", "b", "c"]], "annotations": [{"text": "x"}]}, {"tripleset": []}]')
    with pytest.raises(ValueError, match="mine.json record 1"):
        load_groups("dart", "train", path=str(file))


def test_spec_note_says_the_dev_set_is_the_training_pool():
    spec = TASKS["dart"]
    assert spec.splits == ("train", "test") and spec.kind == "data-to-text"
    assert "train split is not in the data folder" in spec.note
    assert "dev set (dart-v1.1.1-full-dev.json) as its pool" in spec.note
