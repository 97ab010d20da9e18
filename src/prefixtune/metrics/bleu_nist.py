"""BLEU and NIST exactly as the E2E challenge computes them: a port of ``mteval-v13a-sig.pl``.

The E2E script (``measure_scores.py`` of tuetschek/e2e-metrics) writes the system outputs and the
references to SGML files and runs ``mteval-v13a-sig.pl`` (NIST mteval v13a, edited for significance
tests and for a *variable number of references*) with its default options. This module reproduces
that run in Python; every rule below is the script's, not a choice of ours:

* Text: runs of whitespace become one space (the SGML reader joins records), then the mteval v13a
  "basic" tokenisation (``tokenization`` in the script): SGML entities ``&quot; &amp; &lt; &gt;``
  are decoded, **ASCII letters only** are lower-cased (``tr/[A-Z]/[a-z]/``: the script runs without
  ``-c``, so matching is case-insensitive, but ``É`` stays ``É``), punctuation and symbols are split
  off, ``.``/``,`` are split unless between digits, ``-`` is split after a digit.
* References: the E2E script pads every source to the largest reference count with empty strings;
  the edited script skips empty references for the brevity penalty and counts only non-empty ones
  for NIST's average reference length. Passing the real references here gives the same numbers.
* BLEU: corpus level, n = 1..4, clipped counts against the per-n-gram maximum over references,
  brevity penalty against the reference length closest to each output (ties: the shorter).
  The default ``bleu_score`` of v13a is used (``--no-smoothing`` is not passed): at corpus level it
  differs from unsmoothed BLEU only when some n-gram order has no match in the whole corpus, where
  it uses ``1 / (2^k * count)`` for the k-th such order instead of 0.
* NIST: n = 1..5, information weights ``log2(count(w1..wn-1) / count(w1..wn))`` from all
  references of the test set (a quirk kept on purpose: Perl treats the one-word prefix ``"0"`` as
  false and then uses the unigram formula), length penalty ``exp(-beta * log(ratio)^2)`` with
  ``beta = -log(0.5) / log(1.5)^2`` against (total reference words / average reference count).

The E2E script prints both with ``%.4f``; this module returns unrounded values, BLEU on the 0-100
scale, NIST as is.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

# Perl's \s on a decoded (UTF-8) string; Python's \s also matches \x1c-\x1f, which Perl's does not.
_PERL_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WS_RUN = re.compile(f"[{_PERL_WS}]+")
_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([\.,])")
_PERIOD_COMMA_BEFORE = re.compile(r"([\.,])([^0-9])")
_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

BLEU_ORDER = 4
NIST_ORDER = 5
_NIST_BETA = -math.log(0.5) / math.log(1.5) / math.log(1.5)


def mteval_tokenize(text: str) -> list[str]:
    """Tokens of ``text`` as mteval-v13a's default ``tokenization`` (without ``-c``) makes them."""
    # The SGML reader first turns whitespace runs into one space (s/[\s\n\r]+/ /g), so the
    # tokenizer's end-of-line hyphen and line-join rules never fire on E2E input.
    norm = _WS_RUN.sub(" ", text).replace("<skipped>", "")
    norm = norm.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    norm = f" {norm} ".translate(_ASCII_LOWER)
    norm = _PUNCT.sub(r" \1 ", norm)
    norm = _PERIOD_COMMA_AFTER.sub(r"\1 \2 ", norm)
    norm = _PERIOD_COMMA_BEFORE.sub(r" \1 \2", norm)
    norm = _DASH_AFTER_DIGIT.sub(r"\1 \2 ", norm)
    norm = _WS_RUN.sub(" ", norm).strip(" ")
    return norm.split(" ") if norm else []


def _ngrams(words: Sequence[str], max_n: int) -> Counter[tuple[str, ...]]:
    """Counts of all n-grams of ``words`` with 1 <= n <= max_n (``Words2Ngrams``)."""
    return Counter(tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def _closest_length(out_len: int, ref_lens: Sequence[int]) -> int:
    """``brevity_penalty_closest`` folded over the references, as the edited script does it.

    The first reference's length is taken as is; later empty references are skipped; a closer
    length wins and equal distance keeps the shorter.
    """
    best = ref_lens[0]
    for length in ref_lens[1:]:
        if length and (abs(out_len - length), length) < (abs(out_len - best), best):
            best = length
    return best


def _ngram_info(tokenized_refs: Sequence[Sequence[Sequence[str]]]) -> dict[tuple[str, ...], float]:
    """NIST information weight of every reference n-gram (``compute_ngram_info``)."""
    counts: Counter[tuple[str, ...]] = Counter()
    total_words = 0
    for refs in tokenized_refs:
        for ref in refs:
            total_words += len(ref)
            counts.update(_ngrams(ref, NIST_ORDER))
    info = {}
    for ngram, count in counts.items():
        prefix = ngram[:-1]
        # Perl: `$mgram ? count/count(mgram) : count/total` -- the string "0" is false in Perl.
        denominator = counts[prefix] if prefix and prefix != ("0",) else total_words
        info[ngram] = -math.log(count / denominator) / math.log(2)
    return info


@dataclass
class _Totals:
    """Corpus sums that ``score_document`` accumulates over segments (index = n-gram order)."""

    ref_length: int = 0
    nonempty_refs: int = 0
    segments: int = 0
    match: list[int] = field(default_factory=lambda: [0] * (NIST_ORDER + 1))
    hyp_ngrams: list[int] = field(default_factory=lambda: [0] * (NIST_ORDER + 1))
    ref_ngrams: list[int] = field(default_factory=lambda: [0] * (NIST_ORDER + 1))
    hyp_info: list[float] = field(default_factory=lambda: [0.0] * (NIST_ORDER + 1))


def _add_segment(totals: _Totals, out: Sequence[str], refs: Sequence[Sequence[str]],
                 info: dict[tuple[str, ...], float]) -> None:
    """Accumulate one segment's statistics (``score_segment``)."""
    out_counts = _ngrams(out, NIST_ORDER)
    ref_max: Counter[tuple[str, ...]] = Counter()
    for ref in refs:
        ref_max |= _ngrams(ref, NIST_ORDER)
        for n in range(1, NIST_ORDER + 1):
            totals.ref_ngrams[n] += max(len(ref) - n + 1, 0)
    for n in range(1, NIST_ORDER + 1):
        totals.hyp_ngrams[n] += max(len(out) - n + 1, 0)
    for ngram, count in out_counts.items():
        hits = min(count, ref_max[ngram])
        if hits:
            totals.match[len(ngram)] += hits
            totals.hyp_info[len(ngram)] += info[ngram] * hits
    totals.ref_length += _closest_length(len(out), [len(ref) for ref in refs])
    totals.nonempty_refs += sum(1 for ref in refs if ref)
    totals.segments += 1


def _bleu(totals: _Totals) -> float:
    """The default (``bleu_score``) BLEU of mteval v13a on corpus totals, on a 0-1 scale."""
    hyp_len = totals.hyp_ngrams[1]
    if hyp_len == 0:
        return 0.0
    log_sum = 0.0
    smooth = 1
    for n in range(1, BLEU_ORDER + 1):
        if totals.hyp_ngrams[n] == 0:
            continue  # iscore = 0: an order with no n-grams at all counts as precision 1
        if totals.match[n] == 0:
            smooth *= 2
            log_sum += math.log(1 / (smooth * totals.hyp_ngrams[n]))
        else:
            log_sum += math.log(totals.match[n] / totals.hyp_ngrams[n])
    return math.exp(log_sum / BLEU_ORDER) * math.exp(min(0.0, 1 - totals.ref_length / hyp_len))


def _nist_length_penalty(ratio: float) -> float:
    """``nist_length_penalty``: 1 at or above the average reference length, then a Gaussian decay."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def _nist(totals: _Totals) -> float:
    """``nist_score`` on corpus totals: summed information per n-gram, times the length penalty."""
    if totals.ref_ngrams[1] == 0 or totals.nonempty_refs == 0:
        return 0.0
    score = sum(totals.hyp_info[n] / max(totals.hyp_ngrams[n], 1) for n in range(1, NIST_ORDER + 1))
    avg_refs = totals.nonempty_refs / totals.segments
    return score * _nist_length_penalty(totals.hyp_ngrams[1] / (totals.ref_ngrams[1] / avg_refs))


def mteval_bleu_nist(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (0-100) and NIST of ``predictions`` against multi-references, as mteval-v13a-sig.

    Inputs are raw text (the tokenisation above is applied here); callers validate counts.
    """
    outs = [mteval_tokenize(pred) for pred in predictions]
    refs = [[mteval_tokenize(ref) for ref in group] for group in references]
    info = _ngram_info(refs)
    totals = _Totals()
    for out, group in zip(outs, refs):
        _add_segment(totals, out, group, info)
    return {"bleu": 100.0 * _bleu(totals), "nist": _nist(totals)}
