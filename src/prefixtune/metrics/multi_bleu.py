"""BLEU as Moses ``multi-bleu.perl``, the script behind the WebNLG 2017 and DART BLEU numbers.

The port keeps the script's rules, including the ones that make it differ from SacreBLEU:

* Tokens are the whitespace-separated words of the line as given (no tokenisation; Perl's
  ``split`` on ASCII whitespace); ``-lc`` lower-cases ASCII letters (Perl ``lc`` on bytes).
* Every reference file contributes one line per segment, so a segment with fewer references than
  files has **empty references**. An empty reference adds no n-grams, but its length 0 takes part
  in choosing the closest reference length: a 1-word output whose real references are 10 words
  long gets reference length 0 from an empty line. The challenges' numbers include this.
* Brevity penalty from the summed closest lengths (ties: the shorter), no smoothing: an n-gram
  order without any match gives BLEU 0. Output and references both empty: the script prints 0.

Statistics are kept per segment so that corpus BLEU of any subset (WebNLG seen/unseen/all) is
the exact ``multi-bleu.perl`` result on that subset's files.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

ORDER = 4
_ASCII_WS = re.compile(r"[ \t\n\r\x0b\x0c]+")
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")

# One segment: [hyp length, closest reference length, matches n=1..4, hyp n-grams n=1..4].
SegmentStats = list[int]


def _words(text: str, lowercase: bool) -> list[str]:
    if lowercase:
        text = text.translate(_ASCII_LOWER)
    return [word for word in _ASCII_WS.split(text) if word]


def _counts(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def segment_stats(hypothesis: str, references: Sequence[str], lowercase: bool) -> SegmentStats:
    """The counts ``multi-bleu.perl`` adds for one line; ``references`` include empty padding."""
    hyp = _words(hypothesis, lowercase)
    refs = [_words(ref, lowercase) for ref in references]
    closest_diff, closest_len = 9999, 9999
    for ref in refs:
        diff = abs(len(hyp) - len(ref))
        if diff < closest_diff or (diff == closest_diff and len(ref) < closest_len):
            closest_diff, closest_len = diff, len(ref)
    matches, totals = [], []
    for n in range(1, ORDER + 1):
        ref_max: Counter[tuple[str, ...]] = Counter()
        for ref in refs:
            ref_max |= _counts(ref, n)
        hyp_counts = _counts(hyp, n)
        matches.append(sum(min(count, ref_max[ngram]) for ngram, count in hyp_counts.items()))
        totals.append(sum(hyp_counts.values()))
    return [len(hyp), closest_len, *matches, *totals]


def corpus_bleu(stats: Sequence[SegmentStats]) -> float:
    """BLEU (0-100) of the segments whose statistics are given, as the script prints it unrounded."""
    sums = [sum(column) for column in zip(*stats)] if stats else [0] * (2 + 2 * ORDER)
    hyp_len, ref_len = sums[0], sums[1]
    matches, totals = sums[2:2 + ORDER], sums[2 + ORDER:]
    if ref_len == 0 or hyp_len == 0:
        return 0.0  # the script prints "BLEU = 0" (or dies dividing by a zero output length)
    if any(match == 0 for match in matches):
        return 0.0  # my_log(0) = -9999999999: exp of it is 0
    log_precision = sum(math.log(match / total) for match, total in zip(matches, totals)) / ORDER
    brevity = math.exp(1 - ref_len / hyp_len) if hyp_len < ref_len else 1.0
    return 100.0 * brevity * math.exp(log_precision)
