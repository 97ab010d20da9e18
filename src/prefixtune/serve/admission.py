"""Queueing a request's rows, all of them or none, with the HTTP answer when they cannot queue
(shared by /v1/generate and the OpenAI routes)."""

from __future__ import annotations

from .rows import QueueFull, Row
from .scheduler import Batcher
from .schema import ApiError


def submit(batcher: Batcher, rows: list[Row], retry_after_s: int) -> None:
    """Queue `rows`; ApiError 429 (with Retry-After) when the queue cannot take them all, 503 while stopping."""
    try:
        batcher.submit(rows)
    except QueueFull as err:
        raise ApiError(429, "queue_full", f"server busy ({err}); retry later",
                       {"Retry-After": str(retry_after_s)}) from None
    except RuntimeError as err:  # stopping
        raise ApiError(503, "unavailable", str(err)) from None
