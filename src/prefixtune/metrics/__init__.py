"""Official-definition metrics for the prefix-tuning benchmarks.

* :func:`e2e_scores` -- E2E NLG Challenge: BLEU, NIST (mteval-v13a), METEOR, ROUGE-L, CIDEr (MS-COCO).
* :func:`webnlg_scores` -- WebNLG 2017: BLEU, METEOR, TER on seen / unseen / all entries.
* :func:`dart_scores` -- DART: BLEU, METEOR, TER.
* :func:`rouge_scores` -- summarization: ROUGE-1/2/L (rouge-score, stemming).
* :func:`read_predictions`, :func:`read_references` -- the e2e-metrics text formats.

BLEU, METEOR, ROUGE and TER are on the 0-100 scale; NIST and CIDEr as the tools print them.
METEOR (and the E2E PTB tokenizer) need a Java runtime: without one those values are ``None``
and a warning says so. Bad input raises :class:`MetricError`.
"""

from ..extras import needs
from ._common import MetricError
from .io import read_predictions, read_references

with needs("metrics"):  # importing any scorer without the [metrics] extra: one line naming it
    from .e2e import e2e_scores
    from .rouge import rouge_scores
    from .webnlg import dart_scores, webnlg_scores

__all__ = ["MetricError", "dart_scores", "e2e_scores", "read_predictions", "read_references",
           "rouge_scores", "webnlg_scores"]
