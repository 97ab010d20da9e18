"""The server's settings and its command-line flags (no web framework imported here, so that
`prefixtune --help` works without the [serve] extra)."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..models import DEFAULT_MODEL

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Task names (matched in full): a letter or digit, then up to 63 of letters, digits, '_', '.', '-'."""


@dataclass
class ServeSettings:
    """Limits and behaviour of one server; each field has a `prefixtune serve` flag of the same name."""

    prefix_dir: Path | None = None
    """Each subdirectory holding a saved prefix is a task of that name; PUT /v1/tasks/{name} loads only from here."""
    max_batch_size: int = 16
    """Rows decoded together in one forward pass, tasks mixed: the main throughput lever."""
    max_wait_ms: float = 10.0
    """How long an idle worker waits for more rows before it starts: a little latency for fuller batches."""
    max_queue: int = 256
    """Rows that may wait for a batch slot; a request that does not fit gets 429 with Retry-After."""
    max_input_tokens: int = 1024
    """Longest accepted input, in tokens after the task's text format: bounds memory and prefill time."""
    max_new_tokens: int = 256
    """Largest max_new_tokens a request may ask for: bounds how long a row holds a batch slot."""
    default_new_tokens: int = 64
    """max_new_tokens of requests that do not set it."""
    max_inputs_per_request: int = 32
    """Inputs in one request's list, so one request cannot fill the queue alone."""
    request_timeout_s: float = 120.0
    """A request still unfinished after this long is answered 504 and its rows are cancelled."""
    retry_after_s: int = 1
    """Retry-After (seconds) sent with 429."""
    max_body_bytes: int = 1 << 20
    """Largest request body; larger ones are refused with 413 before they are read in full."""
    api_key: str | None = None
    """When set, /v1/* and /metrics need `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    mix_tasks: bool = True
    """False: one task per batch (what an adapter-swapping server does); for comparisons only."""

    def validate(self) -> "ServeSettings":
        """Raise ValueError naming the first bad field; return self."""
        for name, low in (("max_batch_size", 1), ("max_queue", 1), ("max_input_tokens", 1), ("max_new_tokens", 1),
                          ("default_new_tokens", 1), ("max_inputs_per_request", 1), ("max_body_bytes", 1),
                          ("request_timeout_s", 0.001), ("max_wait_ms", 0), ("retry_after_s", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"ServeSettings.{name} must be >= {low:g}, got {getattr(self, name)!r}")
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(f"default_new_tokens ({self.default_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        return self


# --- CLI (wired as `prefixtune serve` in cli.py) ------------------------------------------------------
_LIMIT_FLAGS = {
    "max_batch_size": "rows per forward pass, tasks mixed", "max_wait_ms": "wait for a fuller batch when idle",
    "max_queue": "waiting rows before 429", "max_input_tokens": "longest input, in tokens",
    "max_new_tokens": "cap on a request's max_new_tokens", "default_new_tokens": "max_new_tokens when unset",
    "max_inputs_per_request": "inputs in one request", "request_timeout_s": "504 and cancel after this long",
    "max_body_bytes": "largest request body",
}
"""ServeSettings fields that are plain numbers, with their flag help (`--max-batch-size` etc.)."""


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """All `prefixtune serve` flags."""
    defaults = ServeSettings()
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"alias, local dir or cached HF id (default {DEFAULT_MODEL})")
    parser.add_argument("--prefix-dir", type=Path, required=True, help="directory of tasks: DIR/NAME/ holds a saved prefix")
    parser.add_argument("--prefix", action="append", default=[], metavar="NAME=PATH",
                        help="extra task from a saved prefix elsewhere (repeatable; wins over DIR/NAME)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("PREFIXTUNE_API_KEY"),
                        help="require this key on /v1/* and /metrics (default: $PREFIXTUNE_API_KEY)")
    for name, help_text in _LIMIT_FLAGS.items():
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                            help=f"{help_text} (default {default})")
    parser.add_argument("--one-task-per-batch", action="store_true", help="do not mix tasks in a batch (comparisons)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """ServeSettings from parsed `add_cli_arguments` flags (validated)."""
    limits = {name: getattr(args, name) for name in _LIMIT_FLAGS}
    return ServeSettings(prefix_dir=args.prefix_dir, api_key=args.api_key or None, mix_tasks=not args.one_task_per_batch,
                         **limits).validate()


