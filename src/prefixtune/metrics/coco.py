"""METEOR, ROUGE-L and CIDEr as the E2E script gets them from the MS-COCO caption evaluation code.

``measure_scores.py`` builds MS-COCO structures (one "image" per source, its references as
captions) and runs ``COCOEvalCap``, which first passes every text through the Stanford PTB
tokenizer and then scores the tokenized texts. Reproduced here step by step:

* PTB tokenizer: ``java -cp stanford-corenlp-3.4.1.jar edu.stanford.nlp.process.PTBTokenizer
  -preserveLines -lowerCase`` on a file with one text per line (the jar of ``pycocoevalcap``),
  then the tokens in the wrapper's punctuation list (``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , :
  - -- ... ;``) are dropped. Its quirks are the official behaviour and stay: ``£`` becomes ``#``,
  and lower-cased brackets (``-lrb-``) are not in the list, so they stay. The wrapper runs the
  tokenizer once for references and once for outputs; lines are tokenized independently, so one
  run over both gives the same tokens (checked in the tests). Line breaks inside a text (``\\n``,
  and ``\\r``, U+2028, U+2029, U+0085, which Java would also split on) become spaces.
* METEOR 1.5: ``-l en -norm`` in stdio mode (see :mod:`prefixtune.metrics.meteor`).
* ROUGE-L: ``pycocoevalcap.rouge.Rouge`` (sentence LCS, beta 1.2, best precision and best recall
  over the references, mean over sources).
* CIDEr: ``pycocoevalcap.cider.Cider`` (n = 1..4, sigma 6, the clipped and length-penalised form
  that the COCO code ships as "CIDEr"; document frequencies from the references of this test set).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer as _coco_ptb

from ._common import MetricError
from .meteor import Meteor

PTB_JAR = Path(_coco_ptb.__file__).parent / "stanford-corenlp-3.4.1.jar"
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_LINE_BREAKS = str.maketrans({"\n": " ", "\r": " ", "\u2028": " ", "\u2029": " ", "\x85": " "})


def ptb_tokenize(java: str, texts: Sequence[str]) -> list[str]:
    """Tokenize ``texts`` as ``pycocoevalcap``'s ``PTBTokenizer`` does (one Java run for all)."""
    lines = [text.translate(_LINE_BREAKS) for text in texts]
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(lines).encode("utf-8"))
        path = handle.name
    try:
        done = subprocess.run([java, "-cp", str(PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", path],
                              capture_output=True, check=False, timeout=600)
    finally:
        os.unlink(path)
    if done.returncode != 0:
        raise MetricError(f"PTB tokenizer failed ({done.returncode}): "
                          f"{done.stderr.decode('utf-8', 'replace')[-2000:]}")
    out_lines = done.stdout.decode("utf-8").split("\n")
    if out_lines and out_lines[-1] == "" and len(out_lines) == len(lines) + 1:
        out_lines.pop()
    if len(out_lines) != len(lines):
        raise MetricError(f"PTB tokenizer returned {len(out_lines)} lines for {len(lines)} texts")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in PTB_PUNCTUATION) for line in out_lines]


def _tokenize_all(java: str, predictions: Sequence[str],
                  references: Sequence[Sequence[str]]) -> tuple[list[str], list[list[str]]]:
    """PTB-tokenized predictions and reference groups, from a single tokenizer run."""
    flat_refs = [ref for group in references for ref in group]
    tokens = ptb_tokenize(java, list(predictions) + flat_refs)
    preds, rest = tokens[:len(predictions)], tokens[len(predictions):]
    groups = []
    for group in references:
        groups.append(rest[:len(group)])
        rest = rest[len(group):]
    return preds, groups


def coco_scores(java: str, predictions: Sequence[str],
                references: Sequence[Sequence[str]]) -> dict[str, float]:
    """METEOR (0-100), ROUGE-L (0-100) and CIDEr of raw texts, after the PTB tokenizer.

    Callers validate the inputs; ``java`` is the Java executable.
    """
    preds, groups = _tokenize_all(java, predictions, references)
    with Meteor(java) as meteor:
        meteor_score = meteor.score([meteor.stats(pred, group) for pred, group in zip(preds, groups)])
    gts = {i: group for i, group in enumerate(groups)}
    res = {i: [pred] for i, pred in enumerate(preds)}
    rouge_l, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return {"meteor": 100.0 * meteor_score, "rouge_l": 100.0 * float(rouge_l), "cider": float(cider)}
