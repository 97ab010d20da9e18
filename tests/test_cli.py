"""`prefixtune score` and the CLI's handling of bad input."""

from __future__ import annotations

import json

import pytest

from prefixtune.cli import build_parser, main


def test_score_with_references_file_prints_json(tmp_path, capsys):
    preds = tmp_path / "preds.txt"
    refs = tmp_path / "refs.txt"
    preds.write_text("the eagle is a pub .\nzizzi serves italian food .\n")
    refs.write_text("the eagle is a pub .\nthe eagle , a pub .\n\nzizzi serves italian food .\n")
    assert main(["score", "--task", "e2e", "--predictions", str(preds), "--references", str(refs), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert scores["bleu"] == pytest.approx(100.0)


def test_score_count_mismatch_names_both_numbers(tmp_path, capsys):
    preds = tmp_path / "preds.txt"
    preds.write_text("one line\n")
    assert main(["score", "--task", "e2e", "--split", "test", "--predictions", str(preds)]) == 2
    assert "has 1 predictions but e2e/test has 630 sources" in capsys.readouterr().err


def test_unknown_task_and_missing_prefix_are_clear(tmp_path, capsys):
    assert main(["score", "--task", "nope", "--predictions", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert main(["generate", "--prefix", "oops", "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "expects NAME=DIR, got 'oops'" in capsys.readouterr().err


def test_generate_rejects_bad_jsonl_before_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"task": "e2e", "input": "ok"}\nnot json\n')
    assert main(["generate", "--prefix", f"e2e={tmp_path}", "--input", str(bad)]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
    bad.write_text('{"task": "other", "input": "ok"}\n')
    assert main(["generate", "--prefix", f"e2e={tmp_path}", "--input", str(bad)]) == 2
    assert "asks for task 'other'" in capsys.readouterr().err


def test_train_help_comes_from_config_docstrings():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--train-size" in text and "Low-data setting" in text and "--resume" in text
