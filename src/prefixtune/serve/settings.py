"""The server's settings and its command-line flags (no web framework imported here, so that
`prefixtune --help` works without the [serve] extra)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import BF16_MODES, TextFormat

TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""Task names (matched in full): a letter or digit, then up to 63 of letters, digits, '_', '.', '-'."""
LOG_FORMATS = ("text", "json")
RAY_STORE_POLL_S = 2.0
"""--store-poll-s under --ray when not given."""
API_KEY_ENV = "PREFIXTUNE_API_KEY"
"""Environment variable holding the API key (the other way in is --api-key-file)."""


@dataclass
class ServeSettings:
    """Limits and behaviour of one server; each field has a `prefixtune serve` flag of the same name."""

    prefix_dir: Path | None = None
    """Each subdirectory holding a saved prefix or a PEFT PrefixTuning checkpoint (adapter_config.json +
    adapter_model.safetensors) is a task of that name; PUT /v1/tasks/{name} loads only from here."""
    peft_source_format: str = TextFormat().source
    """Source template of tasks that are PEFT PrefixTuning checkpoints, PEFT saving no text format (must contain
    {input}; {eos} is the tokenizer's end-of-text token); saved prefixtune prefixes keep their own."""
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
    body_timeout_s: float = 10.0
    """A body not received in full within this long (shorter than its Content-Length) is answered 408."""
    max_beams: int = 8
    """Largest num_beams a request may ask for: each beam is a batch lane with its own cache."""
    max_lanes_per_request: int = 64
    """Inputs times num_beams of one request at most: the batch lanes (and cache) one request may hold."""
    api_key: str | None = None
    """When set, /v1/* and /metrics need `Authorization: Bearer KEY` or `X-API-Key: KEY`. The CLI reads it from
    --api-key-file or $PREFIXTUNE_API_KEY only: a key on the command line is visible to every user in `ps`."""
    mix_tasks: bool = True
    """False: one task per batch (what an adapter-swapping server does); for comparisons only."""
    max_tasks: int | None = None
    """Prefixes kept in memory at most (None: all of prefix_dir, loaded at start); with a bound, tasks load on
    their first request and the least recently used one is evicted (rows already decoding keep theirs)."""
    pin: tuple[str, ...] = field(default_factory=tuple)
    """Tasks of prefix_dir loaded at start and never evicted."""
    bf16: str = "off"
    """bf16 autocast for every forward pass: off (each row decodes exactly as it would alone), on, or auto (on
    where a decoding step of this model at max_batch_size rows is measured faster in bf16, see precision.py).
    With bf16 a row's output may differ slightly from fp32 and from the same row in another batch."""
    log_format: str = "text"
    """text: uvicorn's access log; json: one JSON line per generation request (task, route, status, tokens, latency)."""
    store_poll_s: float = 0.0
    """Every this many seconds, look for prefixes added, replaced or deleted in prefix_dir (the mtime and size of
    each NAME/prefix_config.json and its weights, or of a PEFT checkpoint's adapter_config.json and
    adapter_model.safetensors) and load, reload or unload them; 0: never (PUT/DELETE only).
    Replicas that share one prefix directory (`--ray`) see a change within about this long, plus the load."""

    def validate(self) -> "ServeSettings":
        """Raise ValueError naming the first bad field; return self."""
        for name, low in (("max_batch_size", 1), ("max_queue", 1), ("max_input_tokens", 1), ("max_new_tokens", 1),
                          ("default_new_tokens", 1), ("max_inputs_per_request", 1), ("max_body_bytes", 1),
                          ("request_timeout_s", 0.001), ("max_wait_ms", 0), ("retry_after_s", 0),
                          ("body_timeout_s", 0.001), ("max_beams", 1), ("max_lanes_per_request", 1),
                          ("store_poll_s", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"ServeSettings.{name} must be >= {low:g}, got {getattr(self, name)!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("ServeSettings.api_key is empty, which would accept any request: set a key or None")
        if self.max_tasks is not None and self.max_tasks < 1:
            raise ValueError(f"ServeSettings.max_tasks must be >= 1 or unset, got {self.max_tasks!r}")
        bad = [name for name in self.pin if not TASK_NAME.fullmatch(name)]
        if bad:
            raise ValueError(f"ServeSettings.pin: {bad[0]!r} is not a task name (letters, digits, '_', '.', '-')")
        if self.store_poll_s and self.prefix_dir is None:
            raise ValueError(f"ServeSettings.store_poll_s={self.store_poll_s:g} watches the prefix directory: set "
                             "prefix_dir, or 0")
        if self.bf16 not in BF16_MODES:
            raise ValueError(f"ServeSettings.bf16 must be one of {BF16_MODES}, got {self.bf16!r}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"ServeSettings.log_format must be one of {LOG_FORMATS}, got {self.log_format!r}")
        try:
            self.peft_text_format()
        except ValueError as err:
            raise ValueError(f"ServeSettings.peft_source_format: {err}") from None
        if self.default_new_tokens > self.max_new_tokens:
            raise ValueError(f"default_new_tokens ({self.default_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        return self

    def peft_text_format(self) -> TextFormat:
        """The text format of PEFT tasks (ValueError when peft_source_format lacks {input})."""
        return TextFormat(source=self.peft_source_format).validate()


# --- CLI (wired as `prefixtune serve` in cli.py) ------------------------------------------------------
_LIMIT_FLAGS = {
    "max_batch_size": "rows per forward pass, tasks mixed", "max_wait_ms": "wait for a fuller batch when idle",
    "max_queue": "waiting rows before 429", "max_input_tokens": "longest input, in tokens",
    "max_new_tokens": "cap on a request's max_new_tokens", "default_new_tokens": "max_new_tokens when unset",
    "max_inputs_per_request": "inputs in one request", "request_timeout_s": "504 and cancel after this long",
    "max_body_bytes": "largest request body", "body_timeout_s": "408 when the body is not in after this long",
    "max_beams": "largest num_beams of a request", "max_lanes_per_request": "inputs x num_beams of one request",
}
"""ServeSettings fields that are plain numbers, with their flag help (`--max-batch-size` etc.)."""


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """All `prefixtune serve` flags; the base model's (--model, --device, ...) are ModelConfig's, as for
    `generate` and `evaluate`."""
    from ..cli import add_model_options, add_peft_format_option  # cli builds this parser, so imports this lazily

    defaults = ServeSettings()
    add_model_options(parser)
    parser.add_argument("--prefix-dir", type=Path, required=True,
                        help="directory of tasks: DIR/NAME/ holds a saved prefix or a PEFT PrefixTuning checkpoint")
    parser.add_argument("--prefix", action="append", default=[], metavar="NAME=PATH",
                        help="extra task from a saved prefix elsewhere (repeatable; wins over DIR/NAME)")
    add_peft_format_option(parser)  # the same flag as generate's and evaluate's: declared once, in cli.py
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                        help=f"require the key in FILE on /v1/* and /metrics (default: ${API_KEY_ENV}, if set)")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help=f"refused: a key in the command line is visible in ps; use --api-key-file or ${API_KEY_ENV}")
    for name, help_text in _LIMIT_FLAGS.items():
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                            help=f"{help_text} (default {default})")
    parser.add_argument("--one-task-per-batch", action="store_true", help="do not mix tasks in a batch (comparisons)")
    parser.add_argument("--max-tasks", type=int, default=None, metavar="N",
                        help="keep at most N prefixes in memory, least recently used evicted; others load on demand "
                             "(default: all of --prefix-dir, loaded at start)")
    parser.add_argument("--pin", action="append", default=[], metavar="NAME",
                        help="keep task NAME of --prefix-dir always loaded (repeatable)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=defaults.log_format,
                        help="json: one JSON line per generation request on stderr (default text: uvicorn's access log)")
    parser.add_argument("--bf16", choices=BF16_MODES, default=defaults.bf16,
                        help="bf16 autocast for every forward pass: faster on GPUs and CPUs with bf16 units, outputs "
                             "may differ slightly from fp32; auto: on where measured faster (default off)")
    parser.add_argument("--store-poll-s", type=float, default=None, metavar="S",
                        help="reload prefixes added, replaced or deleted in --prefix-dir every S seconds; 0: never "
                             f"(default {RAY_STORE_POLL_S:g} with --ray, else 0)")
    parser.add_argument("--ray", action="store_true",
                        help="serve --replicas copies of this server behind Ray Serve's HTTP proxy on --host/--port "
                             "(needs the [ray] extra)")
    parser.add_argument("--replicas", type=int, default=1, metavar="N", help="Ray Serve replicas (with --ray; default 1)")
    parser.add_argument("--replica-cpus", type=float, default=1.0, metavar="C",
                        help="CPUs Ray reserves for each replica (with --ray; default 1)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="join the Ray cluster at ADDR (host:port of its head) instead of starting one "
                             "(with --ray; default $RAY_ADDRESS, if set)")
    parser.add_argument("--ray-queue", type=int, default=None, metavar="N",
                        help="requests the proxy queues per replica beyond those running; past that 503 queue_full "
                             "(with --ray; default 64)")
    parser.add_argument("--ray-timeout-s", type=float, default=None, metavar="S",
                        help="the proxy answers 408 timeout after S seconds (with --ray; default "
                             "--request-timeout-s + 30, so the server's own 504 comes first)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """ServeSettings from parsed `add_cli_arguments` flags (validated)."""
    limits = {name: getattr(args, name) for name in _LIMIT_FLAGS}
    ray = getattr(args, "ray", False)
    if not ray and (getattr(args, "replicas", 1) != 1 or getattr(args, "replica_cpus", 1.0) != 1.0):
        raise ValueError(f"--replicas {args.replicas} / --replica-cpus {args.replica_cpus} need --ray")
    if ray and args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    _check_ray_proxy(args, ray)
    poll = getattr(args, "store_poll_s", None)
    if poll is None:  # replicas share the directory and PUT/DELETE reach only one of them: watch by default
        poll = RAY_STORE_POLL_S if ray else 0.0
    return ServeSettings(prefix_dir=args.prefix_dir, api_key=_api_key(args), mix_tasks=not args.one_task_per_batch,
                         max_tasks=args.max_tasks, pin=tuple(args.pin), log_format=args.log_format, bf16=args.bf16,
                         store_poll_s=poll, peft_source_format=args.peft_source_format, **limits).validate()



def _check_ray_proxy(args: argparse.Namespace, ray: bool) -> None:
    """--ray-address/--ray-queue/--ray-timeout-s: only with --ray, and in range."""
    given = {flag: getattr(args, name, None) for flag, name in
             (("--ray-address", "ray_address"), ("--ray-queue", "ray_queue"), ("--ray-timeout-s", "ray_timeout_s"))}
    for flag, value in given.items():
        if value is not None and not ray:
            raise ValueError(f"{flag} {value} needs --ray")
    if given["--ray-queue"] is not None and given["--ray-queue"] < 1:
        raise ValueError(f"--ray-queue must be >= 1, got {given['--ray-queue']}")
    if given["--ray-timeout-s"] is not None and not given["--ray-timeout-s"] > 0:
        raise ValueError(f"--ray-timeout-s must be > 0 seconds, got {given['--ray-timeout-s']}")


def _api_key(args: argparse.Namespace) -> str | None:
    """The API key from --api-key-file, else from $PREFIXTUNE_API_KEY; ValueError for a key given in argv or an
    empty one (an empty key must not silently mean "no authentication")."""
    if args.api_key is not None:
        raise ValueError(f"--api-key is refused: a key on the command line is visible to every user of this machine "
                         f"(ps, /proc); put it in a file and pass --api-key-file FILE, or set ${API_KEY_ENV}")
    if args.api_key_file is not None:
        try:
            key = Path(args.api_key_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--api-key-file {args.api_key_file}: cannot read it ({err})") from None
        if not key:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty: write the key into it")
        return key
    key = os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"${API_KEY_ENV} is set but empty: set it to the key, or unset it to serve without one")
    return None if key is None else key.strip()


def warn_if_exposed(host: str, settings: ServeSettings) -> None:
    """A server reachable from other machines without an API key is allowed, but said out loud."""
    if host not in ("127.0.0.1", "localhost", "::1") and settings.api_key is None:
        print(f"prefixtune serve: WARNING: listening on {host} without an API key", file=sys.stderr)
