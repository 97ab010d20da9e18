"""mteval-v13a BLEU and NIST (the E2E definitions) pinned on cases computed by hand."""

from __future__ import annotations

import math

import pytest

from prefixtune.metrics.bleu_nist import mteval_bleu_nist, mteval_tokenize

BETA = -math.log(0.5) / math.log(1.5) ** 2  # NIST length-penalty constant of mteval


def nist_penalty(ratio: float) -> float:
    return math.exp(-BETA * math.log(ratio) ** 2)


def test_tokenization_follows_mteval_v13a_basic_rules():
    tokens = mteval_tokenize("Café ÉCOLE, 1,000.5 costs £20-30 &amp; more.")
    # entities decoded; only ASCII letters lower-cased; comma split unless between digits;
    # dash split after a digit; '&' is in the punctuation class, '£' is not.
    assert tokens == ["café", "École", ",", "1,000.5", "costs", "£20", "-", "30", "&", "more", "."]
    assert mteval_tokenize(" \t\u00a0") == []


def test_bleu_counts_an_order_without_any_ngram_as_precision_one():
    # 2-word outputs have no 3- or 4-grams: v13a's bleu_score scores those orders as 1 (iscore 0),
    # where SacreBLEU would give 0. Precisions 4/4 and 2/2; closest reference lengths 3 + 2 = 5.
    scores = mteval_bleu_nist(["the cat", "a dog"], [["the cat sat"], ["a dog"]])
    assert scores["bleu"] == pytest.approx(100 * math.exp(1 - 5 / 4))


def test_brevity_penalty_takes_the_shorter_of_two_equally_close_references():
    # Output of 3 words, references of 4 and 2 words: the 2-word one counts, so no penalty
    # (taking the 4-word one would give exp(1 - 4/3)). The missing 4-gram order counts as 1.
    scores = mteval_bleu_nist(["a b c"], [["a b c d", "a b"]])
    assert scores["bleu"] == pytest.approx(100.0)


def test_an_order_without_any_match_gets_v13a_default_smoothing():
    # 4-grams: 0 of 1 -> 1 / (2 * 1); other precisions 4/4, 2/3, 1/2; lengths 4 vs 5.
    scores = mteval_bleu_nist(["a b c d"], [["a b c x d"]])
    expected = (1 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25 * math.exp(1 - 5 / 4)
    assert scores["bleu"] == pytest.approx(100 * expected)


def test_empty_output_scores_zero():
    assert mteval_bleu_nist([""], [["a b"]]) == {"bleu": 0.0, "nist": 0.0}


def test_nist_single_reference_by_hand():
    # 5 reference words, each once: unigram information log2(5); every bigram follows its only
    # prefix: information 0. Output 4 words against 5 reference words: ratio 0.8.
    scores = mteval_bleu_nist(["the cat", "a dog"], [["the cat sat"], ["a dog"]])
    assert scores["nist"] == pytest.approx(math.log2(5) * nist_penalty(0.8))


def test_nist_average_reference_length_uses_the_mean_number_of_references():
    # mteval-v13a-sig: total reference words 8, non-empty references 3 over 2 segments, so the
    # average reference length is 8 / 1.5 and the ratio 4 / 5.333 = 0.75 (not 4 / 5, the mean of
    # per-segment averages). Each of a, b, c, d occurs twice in 8 words: information 2 bits;
    # the matched bigrams "a b" and "c d" always follow their prefix: 0 bits.
    scores = mteval_bleu_nist(["a b", "c d"], [["a b", "a b c d"], ["c d"]])
    assert scores["nist"] == pytest.approx(2.0 * nist_penalty(0.75))


def test_nist_keeps_perls_false_zero_prefix():
    # For the bigram "0 x" Perl's `$mgram ? ... : ...` sees the prefix "0" as false and divides
    # by the total word count: log2(2/1) = 1 bit instead of log2(1/1) = 0. Unigrams: 1 bit each.
    scores = mteval_bleu_nist(["0 x"], [["0 x"]])
    assert scores["nist"] == pytest.approx(1.0 + 1.0)
    assert mteval_bleu_nist(["1 x"], [["1 x"]])["nist"] == pytest.approx(1.0)


def test_matching_is_case_insensitive_for_ascii_only():
    assert mteval_bleu_nist(["CAT SAT ON MATS"], [["cat sat on mats"]])["bleu"] == pytest.approx(100.0)
    assert mteval_tokenize("ÉCOLE") == ["École"]
    assert mteval_bleu_nist(["École sat on mats"], [["école sat on mats"]])["bleu"] < 100.0
