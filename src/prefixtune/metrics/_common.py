"""Input checks and small helpers shared by every metric family.

Every public scorer validates its input the same way, so that a wrong call fails loudly with the
numbers that explain it instead of producing a plausible-looking but meaningless score.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence


class MetricError(ValueError):
    """Bad input to a metric: mismatched counts, wrong types, unreadable files."""


def check_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]],
                 *, extra: Sequence[object] | None = None, extra_name: str = "") -> None:
    """Validate one prediction per source and a non-empty list of reference strings per source.

    Counts the empty predictions and reports them with ``warnings.warn``: they are scored as
    empty (as the official scripts do), but a silent run of empty outputs usually means a broken
    generation step, which the caller should see.
    """
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise MetricError("predictions must be a list of strings")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise MetricError("references must be a list of lists of strings")
    if len(predictions) != len(references):
        raise MetricError(f"{len(predictions)} predictions but {len(references)} reference sets: "
                          "there must be exactly one reference set per prediction")
    if extra is not None and len(extra) != len(predictions):
        raise MetricError(f"{len(predictions)} predictions but {len(extra)} {extra_name} flags")
    if not predictions:
        raise MetricError("no predictions to score")
    for i, pred in enumerate(predictions):
        if not isinstance(pred, str):
            raise MetricError(f"prediction {i} is {type(pred).__name__}, not str")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise MetricError(f"reference set {i} must be a list of strings, not {type(refs).__name__}")
        if not refs:
            raise MetricError(f"reference set {i} is empty: every source needs at least one reference")
        for ref in refs:
            if not isinstance(ref, str):
                raise MetricError(f"reference set {i} holds a {type(ref).__name__}, not str")
    empty = sum(1 for pred in predictions if not pred.strip())
    if empty:
        warnings.warn(f"{empty} empty predictions (of {len(predictions)}); they are scored as empty",
                      stacklevel=3)


def java_or_warn(metrics: str) -> str | None:
    """Path of the ``java`` executable, or ``None`` after a visible warning naming what is skipped.

    METEOR (and, for E2E, the PTB tokenizer behind ROUGE-L and CIDEr) only exist as Java programs;
    without Java the honest result is "not computed" (``None``), never a made-up 0.
    """
    java = shutil.which("java")
    if java is None:
        warnings.warn(f"Java runtime not found on PATH: {metrics} skipped (value None). "
                      "Install a Java runtime (e.g. Debian's default-jre-headless) to compute it.",
                      stacklevel=3)
    return java

