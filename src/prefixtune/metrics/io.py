"""Reading system outputs and references in the text formats of the e2e-metrics scripts."""

from __future__ import annotations

import os

from ._common import MetricError


def _read_lines(path: str | os.PathLike[str]) -> list[str]:
    """The stripped lines of a UTF-8 text file (a final newline does not make an extra line)."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as err:
        raise MetricError(f"cannot read {os.fspath(path)!s}: {err}") from err
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.strip() for line in lines]


def read_predictions(path: str | os.PathLike[str]) -> list[str]:
    """One prediction per line, as ``measure_scores.py`` reads a system output file.

    Lines are stripped; empty lines are kept (an empty output is still an output for its source),
    so line ``i`` always belongs to source ``i``.
    """
    return _read_lines(path)


def read_references(path: str | os.PathLike[str]) -> list[list[str]]:
    """Reference groups in the e2e-metrics text format.

    The references of one source are on consecutive lines; sources are separated by one empty
    line; trailing empty lines are ignored. As in ``measure_scores.py``, a file without any empty
    line is a single-reference file: every line is then the one reference of its own source.
    Two empty lines in a row would give a source without references: that is refused.
    """
    lines = _read_lines(path)
    while lines and not lines[-1]:
        lines.pop()
    groups: list[list[str]] = [[]]
    for number, line in enumerate(lines, start=1):
        if line:
            groups[-1].append(line)
        elif groups[-1]:
            groups.append([])
        else:
            raise MetricError(f"{os.fspath(path)!s}: line {number} starts a source without references "
                              "(two empty lines in a row, or an empty first line)")
    if len(groups) == 1:
        return [[line] for line in groups[0]]
    return groups
