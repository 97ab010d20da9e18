"""File readers, input validation and the summarization ROUGE (all without Java)."""

from __future__ import annotations

import pytest

from prefixtune.metrics import (MetricError, dart_scores, e2e_scores, read_predictions, read_references,
                                rouge_scores, webnlg_scores)


def test_read_predictions_keeps_empty_lines_and_strips(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("first output \n\n  third\r\n", encoding="utf-8")
    assert read_predictions(path) == ["first output", "", "third"]


def test_read_references_groups_on_blank_lines(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("a1\na2\n\nb1\n\nc1\nc2\nc3\n\n\n", encoding="utf-8")
    assert read_references(path) == [["a1", "a2"], ["b1"], ["c1", "c2", "c3"]]


def test_read_references_without_blank_lines_is_single_reference(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("a\nb\nc\n", encoding="utf-8")
    assert read_references(path) == [["a"], ["b"], ["c"]]


def test_read_references_refuses_a_source_without_references(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text("a\n\n\nb\n", encoding="utf-8")
    with pytest.raises(MetricError, match="line 3"):
        read_references(path)


@pytest.mark.parametrize("reader", [read_predictions, read_references])
def test_unreadable_files_raise_metric_error_naming_them(reader, tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(MetricError, match="missing.txt"):
        reader(missing)
    with pytest.raises(MetricError, match=str(tmp_path)):
        reader(tmp_path)  # a directory
    binary = tmp_path / "latin1.txt"
    binary.write_bytes(b"caf\xe9\n")
    with pytest.raises(MetricError, match="latin1.txt"):
        reader(binary)


@pytest.mark.parametrize("scorer", [e2e_scores, dart_scores, rouge_scores])
def test_count_mismatch_names_both_numbers(scorer):
    with pytest.raises(MetricError, match=r"3 predictions but 2 reference sets"):
        scorer(["a", "b", "c"], [["a"], ["b"]])


def test_webnlg_checks_the_seen_flags_too():
    with pytest.raises(MetricError, match=r"2 predictions but 1 seen flags"):
        webnlg_scores(["a", "b"], [["a"], ["b"]], [True])


@pytest.mark.parametrize("predictions, references, message", [
    ("a b", [["a b"]], "list of strings"),
    (["a"], [[]], "reference set 0 is empty"),
    (["a"], ["a"], "reference set 0 must be a list"),
    ([None], [["a"]], "prediction 0 is NoneType"),
    (["a"], [["a", 3]], "reference set 0 holds a int"),
    ([], [], "no predictions"),
])
def test_bad_input_is_refused(predictions, references, message):
    with pytest.raises(MetricError, match=message):
        rouge_scores(predictions, references)


def test_metric_error_is_a_value_error():
    assert issubclass(MetricError, ValueError)


def test_rouge_uses_stemming_and_the_best_reference():
    with pytest.warns(UserWarning, match="1 empty predictions"):
        scores = rouge_scores(["The cats sat", ""], [["the cat sat on the mat", "dogs"], ["x"]])
    # "cats" stems to "cat": ROUGE-1 P 3/3, R 3/6; ROUGE-2 P 2/2, R 2/5; LCS 3. The empty
    # prediction scores 0 and halves the mean.
    assert scores["rouge1"] == pytest.approx(100 * (2 * 1 * 0.5 / 1.5) / 2)
    assert scores["rouge2"] == pytest.approx(100 * (2 * 1 * 0.4 / 1.4) / 2)
    assert scores["rougeL"] == pytest.approx(scores["rouge1"])
