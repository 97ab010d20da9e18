"""The server's counters in the Prometheus text format 0.0.4 (small enough not to need a client library)."""

from __future__ import annotations

import threading
from typing import Sequence


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        self.counts = [c + (value <= b) for b, c in zip(self.buckets, self.counts)]
        self.sum, self.count = self.sum + value, self.count + 1

    def samples(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


class Metrics:
    """Server counters in the Prometheus text format 0.0.4 (small enough not to need a client library)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.input_tokens = self.output_tokens = self.cancelled_rows = 0
        self.batch_rows = Histogram((1, 2, 4, 8, 16, 32, 64, 128))
        self.latency = Histogram((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))

    def request(self, status: int) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1

    def observe(self, histogram: Histogram, value: float) -> None:
        with self.lock:
            histogram.observe(value)

    def add(self, **counts: int) -> None:
        """Increase counters by name: input_tokens, output_tokens, cancelled_rows."""
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; `gauges` maps name -> (help, value) for values read at scrape time."""
        p = "prefixtune_"
        with self.lock:
            requests = [f'{p}requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines = _family(p + "requests_total", "counter", "Generate requests by HTTP status.", requests)
            for name, help_text in (("input_tokens", "Prompt tokens of accepted rows."),
                                    ("output_tokens", "Generated tokens of finished rows."),
                                    ("cancelled_rows", "Rows dropped: timeout or client gone.")):
                lines += _family(f"{p}{name}_total", "counter", help_text, [f"{p}{name}_total {getattr(self, name)}"])
            lines += _family(p + "batch_rows", "histogram", "Rows per forward pass (tasks mixed).",
                             self.batch_rows.samples(p + "batch_rows"))
            lines += _family(p + "request_latency_seconds", "histogram", "Generate request latency.",
                             self.latency.samples(p + "request_latency_seconds"))
        for name, (help_text, value) in gauges.items():
            lines += _family(name, "gauge", help_text, [f"{name} {value:g}"])
        return "\n".join(lines) + "\n"
