"""WebNLG 2017 and DART scores: BLEU, METEOR and TER as their official evaluation scripts compute them.

WebNLG 2017 (``webnlg-automatic-evaluation``: ``evaluation.py``, ``bleu_eval_3ref.sh``,
``meteor_eval.sh``, ``ter_eval.sh``):

* Normalisation, in the script's own order. Outputs: strip, ``unidecode``, lower-case,
  ``unidecode`` again, split around every non-word character (``re.split(r'(\\W)')``), single
  spaces. References: split around every non-word character of the *original* text, single
  spaces, lower-case, then ``unidecode`` (so a transliteration that yields punctuation, such as
  ``½`` -> ``1/2``, stays one token in a reference, as in the official files).
* At most the first 3 references of an entry are used by all three metrics.
* BLEU: ``multi-bleu.perl -lc`` over 3 reference files, an empty line where an entry has fewer
  references (see :mod:`prefixtune.metrics.multi_bleu` for what the empty lines do).
* METEOR 1.5: ``-l en -norm -r 3``; missing references are empty lines, sent here as empty
  references (same statistics, see :mod:`prefixtune.metrics.meteor`).
* TER: tercom 0.7.25 with its defaults, via SacreBLEU's tercom re-implementation with the options
  set explicitly: ``normalized=False`` (tercom without ``-N``), ``no_punct=False`` (no ``-P``),
  ``case_sensitive=False`` (tercom lower-cases unless ``-s``), ``asian_support=False``. Multiple
  references as tercom: fewest edits over the references, divided by the mean reference length;
  the corpus score is total edits / total mean reference length. Only real references are used
  (the tercom reference file lists at most 3 per entry, no empty lines).

DART (``evaluation/run_eval_on_dart.sh`` with ``prepare_files.py`` of Yale-LILY/dart):

* The released reference files are lower-cased and split around non-word characters without
  transliteration; outputs are brought to the same form here (the official script expects the
  output file in that form and does not touch it).
* BLEU: ``multi-bleu.perl`` (no ``-lc``; everything is lower-case already) over the first 3
  references, empty lines for missing ones.
* METEOR (``-l en -norm -r 8``) and TER (tercom) against the **first reference only**: the
  official ``prepare_files.py`` writes only reference file 0 into the METEOR (padded with 7 empty
  lines) and TER inputs. Kept as is, because the published DART numbers come from it.

BLEU, METEOR and TER are on the 0-100 scale. Cost: SacreBLEU's TER is pure Python, about 20-30 ms
per output-reference pair on a 2-core CPU (the whole WebNLG test set: roughly 2 minutes); METEOR
adds one JVM start (~6 s) per call.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from contextlib import nullcontext

from sacrebleu.metrics import TER
from unidecode import unidecode

from ._common import check_inputs, java_or_warn
from .meteor import Meteor
from .multi_bleu import corpus_bleu, segment_stats

WEBNLG_MAX_REFS = 3
_NON_WORD = re.compile(r"(\W)")
_TER_OPTIONS = {"normalized": False, "no_punct": False, "asian_support": False, "case_sensitive": False}


def _split_non_word(text: str) -> str:
    """Space around every non-word character, then single spaces (the challenges' "detokenise")."""
    return " ".join(" ".join(_NON_WORD.split(text)).split())


def webnlg_output(text: str) -> str:
    """A system output as WebNLG 2017's ``read_participant`` and ``write_to_file`` normalise it."""
    return _split_non_word(unidecode(unidecode(text.strip()).lower()))


def webnlg_reference(text: str) -> str:
    """A reference as WebNLG 2017's reference-file generators normalise it."""
    return unidecode(_split_non_word(text).lower())


def dart_text(text: str) -> str:
    """Output or reference in the form of DART's released reference files."""
    return _split_non_word(text.lower())


def _subset_scores(java: str | None, outputs: Sequence[str], bleu_refs: Sequence[Sequence[str]],
                   meteor_refs: Sequence[Sequence[str]], ter_refs: Sequence[Sequence[str]],
                   subsets: dict[str, list[int]], lowercase: bool) -> dict[str, dict]:
    """BLEU, METEOR, TER of normalised texts on each named subset of segment indices.

    Per-segment statistics are computed once and summed per subset: the result for a subset is
    what the official scripts give on that subset's files. An empty subset scores ``None``.
    """
    bleu_stats = [segment_stats(out, refs, lowercase) for out, refs in zip(outputs, bleu_refs)]
    ter = TER(**_TER_OPTIONS)
    ter_stats = [ter.sentence_score(out, list(refs)) for out, refs in zip(outputs, ter_refs)]
    meteor_stats: list[str] | None = None
    results: dict[str, dict] = {}
    with Meteor(java) if java is not None else nullcontext() as meteor:
        if meteor is not None:
            meteor_stats = [meteor.stats(out, refs) for out, refs in zip(outputs, meteor_refs)]
        for name, indices in subsets.items():
            if not indices:
                results[name] = {"bleu": None, "meteor": None, "ter": None}
                continue
            results[name] = {
                "bleu": corpus_bleu([bleu_stats[i] for i in indices]),
                "meteor": None if meteor_stats is None
                else 100.0 * meteor.score([meteor_stats[i] for i in indices]),
                "ter": _ter(sum(ter_stats[i].num_edits for i in indices),
                            sum(ter_stats[i].ref_length for i in indices)),
            }
    return results


def _ter(edits: float, ref_length: float) -> float:
    """Corpus TER (0-100) from summed edits and mean reference lengths, as tercom reports it.

    With no reference words at all SacreBLEU's convention applies: 100 if anything must be
    inserted, else 0.
    """
    if ref_length > 0:
        return 100.0 * edits / ref_length
    return 100.0 if edits > 0 else 0.0


def _pad(refs: Sequence[str], size: int) -> list[str]:
    """The first ``size`` references, then empty lines up to ``size`` (a reference file's view)."""
    kept = list(refs[:size])
    return kept + [""] * (size - len(kept))


def webnlg_scores(predictions: list[str], references: list[list[str]], seen: list[bool]) -> dict:
    """WebNLG 2017 BLEU, METEOR and TER on the seen (S), unseen (U) and all (A) test entries.

    ``predictions`` and ``references`` are raw texts in test order (the ``lex`` texts of each
    entry, in file order); ``seen[i]`` tells whether entry ``i`` belongs to a category seen in
    training. Returns ``{"seen": {...}, "unseen": {...}, "all": {...}}``, each with ``bleu``,
    ``meteor`` and ``ter`` (``None`` for an empty subset, and METEOR ``None`` without Java).
    """
    check_inputs(predictions, references, extra=seen, extra_name="seen")
    outputs = [webnlg_output(pred) for pred in predictions]
    refs = [[webnlg_reference(ref) for ref in group[:WEBNLG_MAX_REFS]] for group in references]
    padded = [_pad(group, WEBNLG_MAX_REFS) for group in refs]
    subsets = {"seen": [i for i, flag in enumerate(seen) if flag],
               "unseen": [i for i, flag in enumerate(seen) if not flag],
               "all": list(range(len(outputs)))}
    java = java_or_warn("METEOR")
    return _subset_scores(java, outputs, padded, padded, refs, subsets, lowercase=True)


def dart_scores(predictions: list[str], references: list[list[str]]) -> dict:
    """DART BLEU, METEOR and TER as ``run_eval_on_dart.sh`` computes them (see the module notes).

    ``references[i]`` are the raw reference texts of example ``i`` in file order; the first one
    is the only one METEOR and TER see, BLEU sees the first three.
    """
    check_inputs(predictions, references)
    outputs = [dart_text(pred) for pred in predictions]
    refs = [[dart_text(ref) for ref in group] for group in references]
    bleu_refs = [_pad(group, 3) for group in refs]
    meteor_refs = [_pad(group[:1], 8) for group in refs]
    ter_refs = [group[:1] for group in refs]
    java = java_or_warn("METEOR")
    everything = {"all": list(range(len(outputs)))}
    return _subset_scores(java, outputs, bleu_refs, meteor_refs, ter_refs, everything, lowercase=False)["all"]
