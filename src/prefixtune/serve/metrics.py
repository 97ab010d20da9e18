"""The server's Prometheus metrics (prometheus_client), one registry per app.

Who records what: `requestlog.RequestLog` counts requests and errors by route, task and status;
`served_route.ServedRoute` counts tokens and times rows (queue, first token, per output token); the
scheduler counts cancelled rows and rows per forward pass; `taskcache.TaskCache` its hits, misses and
evictions; gauges are read from the batcher and the task table at scrape time (`bind`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from ..multi import MultiPrefixModel
    from .scheduler import Batcher

CONTENT_TYPE = CONTENT_TYPE_LATEST
"""Content type of `render()` (the Prometheus text exposition format)."""

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """Counters, histograms and gauges of one server.

    Task labels carry only names of tasks that were resolved (loaded or loadable), never a name a client
    made up, so a client cannot grow the exposition without bound. Histograms are labelled by route only:
    per-task histograms would multiply every bucket by the number of tasks.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("prefixtune_requests", "Generation requests by route, task and HTTP status.",
                                ["route", "task", "status"], registry=reg)
        self.errors = Counter("prefixtune_errors", "Failed generation requests by route, task and error type "
                              "(a stream that fails after its 200 counts here too).", ["route", "task", "type"],
                              registry=reg)
        self.input_tokens = Counter("prefixtune_input_tokens", "Prompt tokens of queued rows.", ["route", "task"],
                                    registry=reg)
        self.output_tokens = Counter("prefixtune_output_tokens", "Generated tokens received by requests.",
                                     ["route", "task"], registry=reg)
        self.cancelled = Counter("prefixtune_cancelled_rows", "Rows dropped before their end: timeout, client "
                                 "gone, or a stop sequence reached.", registry=reg)
        self.queue_time = Histogram("prefixtune_queue_seconds", "Time a row waited before decoding started.",
                                    ["route"], buckets=_SECONDS, registry=reg)
        self.time_to_first_token = Histogram(
            "prefixtune_time_to_first_token_seconds", "Request arrival to a row's first token (rows whose tokens "
            "are streamed out of the engine: streams, and OpenAI rows with stop sequences).", ["route"],
            buckets=_SECONDS, registry=reg)
        self.time_per_output_token = Histogram(
            "prefixtune_time_per_output_token_seconds", "Mean time between a streamed row's tokens after the first.",
            ["route"], buckets=_PER_TOKEN, registry=reg)
        self.request_latency = Histogram("prefixtune_request_latency_seconds", "Latency of completed requests.",
                                         ["route"], buckets=_SECONDS, registry=reg)
        self.latency = self.request_latency.labels("/v1/generate")
        """The /v1/generate series, which `routes.GenerateRoute` observes."""
        self.batch_rows = Histogram("prefixtune_batch_rows", "Rows per forward pass (tasks mixed).", buckets=_ROWS,
                                    registry=reg)
        self.cache_hits = Counter("prefixtune_task_cache_hits", "Requests whose task was resident.", registry=reg)
        self.cache_misses = Counter("prefixtune_task_cache_misses", "Requests whose task was loaded from the prefix "
                                    "directory on demand.", registry=reg)
        self.cache_evictions = Counter("prefixtune_task_cache_evictions", "Tasks unloaded to stay within --max-tasks.",
                                       registry=reg)

    def bind(self, batcher: "Batcher", multi: "MultiPrefixModel") -> None:
        """Gauges read at scrape time: queue depth, active rows, loaded tasks and their prefixes' bytes."""
        for name, help_text, read in (
                ("prefixtune_queue_depth", "Rows waiting for a batch slot.", lambda: batcher.queue_depth),
                ("prefixtune_active_rows", "Rows being decoded step by step.", lambda: batcher.active_rows),
                ("prefixtune_tasks", "Loaded (resident) tasks.", lambda: len(multi.tasks())),
                ("prefixtune_task_bytes", "Bytes of the loaded tasks' prefix tensors.", lambda: _prefix_bytes(multi))):
            Gauge(name, help_text, registry=self.registry).set_function(read)

    # --- what the scheduler and the routes call ----------------------------------------------------
    def add(self, *, cancelled_rows: int) -> None:
        """Count rows the scheduler dropped (its only counter; tokens are counted where the route is known)."""
        self.cancelled.inc(cancelled_rows)

    def observe(self, histogram, value: float) -> None:
        histogram.observe(value)

    @property
    def cancelled_rows(self) -> int:
        return int(self.total("prefixtune_cancelled_rows_total"))

    # --- reading -----------------------------------------------------------------------------------
    def total(self, sample: str, **labels: str) -> float:
        """Sum of the samples named `sample` whose labels include `labels` (0 when there are none)."""
        return sum(s.value for family in self.registry.collect() for s in family.samples
                   if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))

    def render(self) -> bytes:
        """The exposition text (CONTENT_TYPE)."""
        return generate_latest(self.registry)


def _prefix_bytes(multi: "MultiPrefixModel") -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
               for task in multi.tasks().values() for k, v in task.prefix.kv.values())
