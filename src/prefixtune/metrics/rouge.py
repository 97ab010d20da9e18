"""ROUGE-1/2/L for summarization, with Google's ``rouge-score`` package and Porter stemming.

Settings, all explicit: ``RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)`` with the
package's default tokenizer (lower-case, every non ``[a-z0-9]`` character becomes a space, Porter
stemming of tokens longer than 3 characters). ``rougeL`` is the sentence-level LCS (not the
newline-split ``rougeLsum``). Scores are F-measures.

Several references: for each prediction and each ROUGE type, the reference with the highest
F-measure is taken (``RougeScorer.score_multi``; its precision and recall come from that same
reference). The corpus score is the mean over predictions, times 100.
"""

from __future__ import annotations

from rouge_score.rouge_scorer import RougeScorer

from ._common import check_inputs

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F-measure (0-100) over predictions; best reference each."""
    check_inputs(predictions, references)
    scorer = RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, refs in zip(predictions, references):
        best = scorer.score_multi(list(refs), pred)
        for rouge_type in ROUGE_TYPES:
            totals[rouge_type] += best[rouge_type].fmeasure
    return {rouge_type: 100.0 * total / len(predictions) for rouge_type, total in totals.items()}
