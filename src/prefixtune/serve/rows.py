"""What the serving engine passes around: a row (one input of one request), its events (`Outbox`), and
the helpers that shape rows into batches.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..decoding import Request
from ..config import GenerateConfig
from ..prefix import PrefixKV

Emit = Callable[[str, dict], None]


class QueueFull(Exception):
    """The waiting queue cannot take a request's rows now; the client should retry later."""


@dataclass(eq=False)
class Row:
    """One input of one request: what to decode, and where its events go.

    The worker calls `emit(kind, data)`: "token" events (streaming rows only), then exactly one "done" or
    "error". `emit` must be thread-safe and must not block (it hands the event to the request's loop).
    """

    task: str
    prefix: PrefixKV
    prompt: list[int]
    config: GenerateConfig
    emit: Emit
    stream: bool = False
    arrived: float = field(default_factory=time.monotonic)
    admitted: float = 0.0
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    """Set by the request side (timeout, client gone): the worker drops the row at the next step."""
    finished: bool = False
    sent: str = ""
    """Text already streamed, to send only the new part of the decoded text."""
    request: Request | None = None
    """The engine's request for this row, once the row has joined the running batch."""


def options_key(config: GenerateConfig) -> tuple:
    """Decoding options that must be equal for rows to share one `generate` call (not seed, not batch size)."""
    return dataclasses.astuple(dataclasses.replace(config, batch_size=1, seed=None))


class Outbox:
    """Turns a row's tokens into events: text deltas while streaming, then the final text and counts.

    The final text is decoded exactly as `MultiPrefixModel.generate` does (special tokens skipped, stripped).
    The tokenizer is shared with the request handlers, so every use holds `lock`.
    """

    def __init__(self, tokenizer, lock: threading.Lock):
        self.tokenizer, self.lock = tokenizer, lock
        self.eos = tokenizer.eos_token_id

    def token(self, row: Row, token: int) -> None:
        if not row.stream:
            return
        with self.lock:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        delta = ""
        if text.startswith(row.sent) and not text.endswith("\ufffd"):  # U+FFFD: a character still incomplete
            delta, row.sent = text[len(row.sent):], text
        self._send(row, "token", {"token_id": token, "text": delta})

    def done(self, row: Row) -> None:
        with self.lock:
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
        reason = "stop" if row.tokens and row.tokens[-1] == self.eos else "length"
        self._send(row, "done", {"text": text, "input_tokens": len(row.prompt), "output_tokens": len(row.tokens),
                                 "finish_reason": reason, "queue_ms": 1000 * (row.admitted - row.arrived)})

    def error(self, row: Row, message: str) -> None:
        self._send(row, "error", {"message": message})

    def _send(self, row: Row, kind: str, data: dict) -> None:
        if row.finished:
            return
        row.finished = kind != "token"
        try:
            row.emit(kind, data)
        except RuntimeError:  # the request's event loop is closed: nobody is listening any more
            row.cancelled = True
