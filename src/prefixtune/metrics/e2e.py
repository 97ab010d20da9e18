"""The five E2E NLG Challenge metrics, as ``measure_scores.py`` of tuetschek/e2e-metrics reports them."""

from __future__ import annotations

from ._common import check_inputs, java_or_warn
from .bleu_nist import mteval_bleu_nist
from .coco import coco_scores


def e2e_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """BLEU, NIST, METEOR, ROUGE-L and CIDEr of one output per source against its references.

    ``references[i]`` holds every human reference of source ``i`` (for the E2E CSV files: the rows
    of one MR, in file order, with the challenge's character repairs already applied). Texts are
    raw; each metric applies its own official tokenisation:

    * ``bleu`` (0-100) and ``nist``: NIST mteval-v13a-sig as the E2E script runs it (basic
      tokenisation, ASCII lower-casing, corpus level, closest reference length with ties to the
      shorter, no smoothing in effect); see :mod:`prefixtune.metrics.bleu_nist`.
    * ``meteor`` (0-100, METEOR 1.5 ``-l en -norm``), ``rouge_l`` (0-100) and ``cider``: the MS-COCO
      caption code after its PTB tokenizer; see :mod:`prefixtune.metrics.coco`.

    The official script strips each line it reads; so does this function. Without a Java runtime
    the three COCO metrics cannot be computed the official way (the PTB tokenizer is Java too):
    they are ``None`` and a warning says so.
    """
    check_inputs(predictions, references)
    preds = [pred.strip() for pred in predictions]
    refs = [[ref.strip() for ref in group] for group in references]
    scores: dict[str, float | None] = dict(mteval_bleu_nist(preds, refs))
    java = java_or_warn("METEOR, ROUGE-L and CIDEr (they need the Java PTB tokenizer)")
    if java is None:
        scores.update(meteor=None, rouge_l=None, cider=None)
    else:
        scores.update(coco_scores(java, preds, refs))
    return {key: scores[key] for key in ("bleu", "nist", "meteor", "rouge_l", "cider")}
