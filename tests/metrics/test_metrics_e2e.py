"""E2E scores on tiny corpora computed by hand, the PTB tokenizer step, and running without Java."""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import pytest

from prefixtune.metrics import MetricError, e2e_scores
from prefixtune.metrics.coco import ptb_tokenize
from prefixtune.metrics.meteor import Meteor

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need Java")

PREDICTIONS = ["The cat sat on the mat.", "A dog ran in the park!"]
REFERENCES = [["the cat sat on the mat"], ["a dog ran in the park"]]


@pytest.fixture(scope="module")
def two_sentence_scores() -> dict:
    """One run (two JVM starts) shared by the hand-checked assertions below."""
    return e2e_scores(PREDICTIONS, REFERENCES)


@needs_java
def test_bleu_sees_the_punctuation_that_the_coco_metrics_drop(two_sentence_scores):
    # mteval keeps "." and "!" as tokens: 7-word outputs, 6-word references; matches 12/14,
    # 10/12, 8/10, 6/8; no brevity penalty.
    expected = (12 / 14 * 10 / 12 * 8 / 10 * 6 / 8) ** 0.25
    assert two_sentence_scores["bleu"] == pytest.approx(100 * expected)


@needs_java
def test_coco_metrics_after_ptb_tokenization(two_sentence_scores):
    # After the PTB step (lower-case, punctuation dropped) each output equals its reference.
    # METEOR 1.5 gives a complete single-chunk match no fragmentation penalty; ROUGE-L is 1;
    # CIDEr: identical tf-idf vectors for n = 1..4 give cosine 1, times 10.
    assert two_sentence_scores["meteor"] == pytest.approx(100.0)
    assert two_sentence_scores["rouge_l"] == pytest.approx(100.0)
    assert two_sentence_scores["cider"] == pytest.approx(10.0)


@needs_java
def test_cider_idf_comes_from_the_test_references():
    # With a single source every n-gram occurs in all (one) reference sets: idf = log(1/1) = 0,
    # so even a perfect output scores CIDEr 0; METEOR and ROUGE-L do not depend on the corpus.
    scores = e2e_scores(PREDICTIONS[:1], REFERENCES[:1])
    assert scores["cider"] == 0.0
    assert scores["rouge_l"] == pytest.approx(100.0)


@needs_java
def test_ptb_tokenizer_quirks_are_kept():
    texts = ["Costs £20 (cheap), isn't it?", "", "Line\nbreak", "Crème Brûlée - OK..."]
    assert ptb_tokenize(shutil.which("java"), texts) == [
        "costs # 20 -lrb- cheap -rrb- is n't it",  # £ -> #, lower-cased brackets stay
        "",
        "line break",
        "crème brûlée ok",
    ]


def test_without_java_the_coco_metrics_are_none_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.warns(UserWarning, match="Java runtime not found.*METEOR, ROUGE-L and CIDEr"):
        scores = e2e_scores(PREDICTIONS, REFERENCES)
    assert scores["meteor"] is None and scores["rouge_l"] is None and scores["cider"] is None
    assert scores["bleu"] == pytest.approx(100 * (12 / 14 * 10 / 12 * 8 / 10 * 6 / 8) ** 0.25)
    assert scores["nist"] > 0


def test_empty_predictions_are_scored_and_counted(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.warns(UserWarning) as caught:
        scores = e2e_scores(["", "a dog ran in the park", "  "], REFERENCES + [["x"]])
    assert any("2 empty predictions" in str(w.message) for w in caught)
    # all 6 output words match, but the empty outputs still add their reference lengths: 6 + 6 + 1
    assert scores["bleu"] == pytest.approx(100 * 2.718281828459045 ** (1 - 13 / 6))


@needs_java
def test_java_processes_are_closed_after_scoring(two_sentence_scores):
    assert two_sentence_scores["meteor"] is not None  # the shared run has happened
    assert psutil.Process().children(recursive=True) == []


def _fake_java(tmp_path: Path) -> str:
    """A 'java' that dies at once, as a broken runtime would."""
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'Error: broken JVM' >&2\nexit 3\n", encoding="utf-8")
    fake.chmod(0o755)
    return str(fake)


def test_a_dying_meteor_process_raises_instead_of_hanging(tmp_path):
    with pytest.raises(MetricError, match="broken JVM"), Meteor(_fake_java(tmp_path)) as meteor:
        meteor.stats("a b", ["a b"])
    assert psutil.Process().children(recursive=True) == []


def test_a_failing_ptb_tokenizer_raises(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    _fake_java(tmp_path)
    with pytest.raises(MetricError, match="PTB tokenizer failed.*broken JVM"):
        e2e_scores(PREDICTIONS, REFERENCES)
