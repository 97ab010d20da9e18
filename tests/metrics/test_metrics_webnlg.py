"""WebNLG 2017 and DART definitions: normalisation, multi-bleu, TER and reference handling by hand."""

from __future__ import annotations

import pytest
from metrics_data import DATA_DIR, lex_entries

from prefixtune.metrics import dart_scores, webnlg_scores
from prefixtune.metrics.multi_bleu import corpus_bleu, segment_stats
from prefixtune.metrics.webnlg import dart_text, webnlg_output, webnlg_reference

# The first three lines of DART's released evaluation/dart_reference/all-delex-reference0.lex
# (Yale-LILY/dart, MIT licence): the form that outputs and references must have.
DART_RELEASED_REF0 = [
    "jeff daniels played in the hawaii five - o episode the flight of the jewels",
    "in 1982 , jed jenkins in american playhouse was played by jeff daniels .",
    "jeff daniels hosted an episode of saturday night live in 1991 .",
]


@pytest.fixture
def no_java(monkeypatch, tmp_path):
    """Hide Java: METEOR becomes None (with a warning); BLEU and TER do not need it."""
    monkeypatch.setenv("PATH", str(tmp_path))


def test_outputs_and_references_are_normalised_in_the_official_order():
    text = "  Ünïcödé ½ Naïve-café's (1990)  "
    # outputs: transliterate first, then split around non-word characters
    assert webnlg_output(text) == "unicode 1 / 2 naive - cafe ' s ( 1990 )"
    # references: split the original text first, transliterate last ("1/2" stays one token)
    assert webnlg_reference(text) == "unicode  1/2 naive - cafe ' s ( 1990 )"
    assert dart_text(text) == "ünïcödé ½ naïve - café ' s ( 1990 )"


def test_dart_normalisation_reproduces_the_released_reference_file():
    entries = lex_entries(DATA_DIR / "dart" / "dart-v1.1.1-full-test.xml")
    assert [dart_text(texts[0]) for _, texts in entries[:3]] == DART_RELEASED_REF0


def test_multi_bleu_empty_reference_lines_take_part_in_the_closest_length():
    # 1 real reference of 14 words, 2 empty lines: the 4-word output is closest to length 0.
    long_ref = "a b c d e f g h i j k l m n"
    padded = segment_stats("a b c d", [long_ref, "", ""], lowercase=True)
    assert padded[:2] == [4, 0]
    assert corpus_bleu([padded]) == 0.0  # multi-bleu prints "BLEU = 0" when the reference length is 0
    both = [padded, segment_stats("x", ["x", "", ""], lowercase=True)]
    assert corpus_bleu(both) == pytest.approx(100.0)  # reference length 0 + 1 < 5 output words
    unpadded = [segment_stats("a b c d", [long_ref], True), segment_stats("x", ["x"], True)]
    assert corpus_bleu(unpadded) == pytest.approx(100 * 2.718281828459045 ** (1 - 15 / 5))


def test_multi_bleu_has_no_smoothing_and_lowercases_only_with_lc():
    assert corpus_bleu([segment_stats("a b c d", ["a b c x"], lowercase=True)]) == 0.0
    assert corpus_bleu([segment_stats("A B C D", ["a b c d"], lowercase=True)]) == pytest.approx(100.0)
    assert corpus_bleu([segment_stats("A B C D", ["a b c d"], lowercase=False)]) == 0.0


def test_webnlg_bleu_uses_the_three_padded_reference_files(no_java):
    with pytest.warns(UserWarning, match="METEOR skipped"):
        scores = webnlg_scores(["a b c d", "x"], [["a b c d e f g h i j k l m n"], ["x"]], [True, False])
    assert scores["all"]["bleu"] == pytest.approx(100.0)
    assert scores["seen"]["bleu"] == 0.0
    assert scores["all"]["meteor"] is None


def test_ter_follows_tercom_by_hand(no_java):
    preds = ["a b c d", "a b c", "c d a b", "a b x"]
    refs = [["a b c d"], ["a b c d"], ["a b c d"], ["a b c d", "a b c", "q"]]
    with pytest.warns(UserWarning):
        per_entry = [webnlg_scores([p], [r], [True])["all"]["ter"] for p, r in zip(preds, refs)]
    # exact; one insertion of 4 words; one block shift of 4; best of three references
    # (1 substitution against "a b c") over their mean length (4 + 3 + 1) / 3.
    assert per_entry == pytest.approx([0.0, 25.0, 25.0, 100 * 1 / (8 / 3)])
    with pytest.warns(UserWarning):
        corpus = webnlg_scores(preds, refs, [True] * 4)["all"]["ter"]
    assert corpus == pytest.approx(100 * (0 + 1 + 1 + 1) / (4 + 4 + 4 + 8 / 3))


def test_webnlg_uses_at_most_three_references_and_splits_seen_unseen(no_java):
    refs = [["w x y z", "w x y z", "w x y z", "a b c d"], ["a b c d"]]
    with pytest.warns(UserWarning):
        scores = webnlg_scores(["a b c d", "a b c d"], refs, [True, False])
    assert scores["seen"]["ter"] == pytest.approx(100.0)  # the 4th reference is never seen
    assert scores["unseen"]["ter"] == 0.0
    assert scores["all"]["ter"] == pytest.approx(50.0)


def test_empty_split_scores_none(no_java):
    with pytest.warns(UserWarning):
        scores = webnlg_scores(["a b c d"], [["a b c d"]], [True])
    assert scores["unseen"] == {"bleu": None, "meteor": None, "ter": None}
    assert scores["seen"]["bleu"] == pytest.approx(100.0)


def test_dart_meteor_and_ter_see_only_the_first_reference(no_java):
    with pytest.warns(UserWarning):
        scores = dart_scores(["A b c d."], [["w x y z", "a b c d ."]])
    assert scores["bleu"] == pytest.approx(100.0)  # BLEU sees the first three references
    assert scores["ter"] == pytest.approx(100.0 * 5 / 4)  # TER only "w x y z": 4 subs + 1 insertion
    assert scores["meteor"] is None
