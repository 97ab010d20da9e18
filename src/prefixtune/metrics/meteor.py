"""METEOR 1.5 through the jar shipped inside ``pycocoevalcap``, one Java process per scoring call.

Both official setups run the same jar with ``-l en -norm``: the E2E script through the MS-COCO
wrapper's ``-stdio`` mode, WebNLG 2017 and DART on files with ``-r N``. In stdio mode every
segment is sent as ``SCORE ||| ref1 ||| ... ||| hyp`` and answered by a line of sufficient
statistics; ``EVAL ||| stats ||| ...`` then aggregates any subset of segments into the corpus
score, so one process (one slow paraphrase-table load) serves several subsets. File mode with
``-r N`` pads missing references with empty lines; sending the same empty strings in stdio mode
gives the same statistics (the tests check this against a file-mode run of the jar), including
the case where no reference matches and the first one is kept.

The process is started in ``__enter__`` and always closed and reaped in ``__exit__``; its stderr
goes to a temporary file so that a chatty or dying JVM can neither block nor fail silently.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from pycocoevalcap.meteor import meteor as _coco_meteor

from ._common import MetricError

METEOR_JAR = Path(_coco_meteor.__file__).parent / "meteor-1.5.jar"
METEOR_OPTIONS = ("-l", "en", "-norm")
_LINE_BREAKS = str.maketrans({"\n": " ", "\r": " "})


class Meteor:
    """A running ``meteor-1.5.jar - - -stdio -l en -norm``; use as a context manager."""

    def __init__(self, java: str) -> None:
        self._cmd = [java, "-jar", "-Xmx2G", str(METEOR_JAR), "-", "-", "-stdio", *METEOR_OPTIONS]
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    def __enter__(self) -> Meteor:
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(self._cmd, cwd=METEOR_JAR.parent, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None:
            if self._proc.stdin is not None:
                try:
                    self._proc.stdin.close()
                except OSError:  # the JVM already died: nothing left to flush
                    pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _ask(self, line: str) -> str:
        """Send one request line, return the first answer line (raises if the JVM died)."""
        assert self._proc is not None and self._proc.stdin is not None, "use Meteor as a context manager"
        try:
            self._proc.stdin.write(line.encode("utf-8") + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._fail()
        return self._read()

    def _read(self) -> str:
        assert self._proc is not None and self._proc.stdout is not None
        answer = self._proc.stdout.readline()
        if not answer:
            self._fail()
        return answer.decode("utf-8").strip()

    def _fail(self) -> None:
        assert self._stderr is not None
        self._stderr.seek(0)
        tail = self._stderr.read()[-2000:].decode("utf-8", "replace")
        raise MetricError(f"METEOR (java -jar {METEOR_JAR.name}) stopped unexpectedly: {tail}")

    def stats(self, hypothesis: str, references: Sequence[str]) -> str:
        """Sufficient statistics of one segment.

        The hypothesis is cleaned as the MS-COCO wrapper does (``|||`` removed, double spaces
        halved); line breaks anywhere would break the line protocol and become spaces.
        """
        hyp = hypothesis.replace("|||", "").replace("  ", " ").translate(_LINE_BREAKS)
        refs = " ||| ".join(ref.translate(_LINE_BREAKS) for ref in references)
        return self._ask(f"SCORE ||| {refs} ||| {hyp}")

    def score(self, stats: Sequence[str]) -> float:
        """Corpus METEOR (0-1) of the segments whose statistics are given."""
        first = self._ask("EVAL ||| " + " ||| ".join(stats))
        lines = [first] + [self._read() for _ in range(len(stats))]
        return float(lines[-1])  # one score per segment, then the aggregate
