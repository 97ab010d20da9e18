"""The server's scheduler: a bounded queue of rows and the worker that feeds them to the decoding engine.

Each forward pass carries as many rows, of any tasks and options, as fit (`max_batch_size`): rows join the
engine's running batch between steps and leave when they end (decoding/engine.py), so greedy, sampling and
beam-search rows share passes and a beam-search row never pauses a stream. Each row decodes as it would
alone (the engine's guarantee, tested there and in tests/serve/). Models the engine cannot run
(encoder-decoder, sliding-window caches) are decoded in groups of equal options by `generate_ids`
(transformers' generate) in a second worker.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Callable

import torch

from .. import _compat
from ..config import GenerateConfig
from ..decoding import Engine, Request, decoding_kwargs, generate_ids, left_pad
from ..multi import MultiPrefixModel
from .metrics import Metrics
from .rows import Outbox, QueueFull, Row, options_key

logger = logging.getLogger("prefixtune.serve")


class Batcher:
    """The bounded queue of waiting rows and the worker thread that batches them.

    An idle worker waits up to `max_wait_s` after the oldest row arrived (or until `max_batch_size` rows
    wait) before starting; a busy one takes waiting rows into the running batch between steps. With
    `mix_tasks=False` a batch holds one task at a time (how a server that swaps adapters per batch works):
    rows of the running task join only while the oldest waiting row has that task too.
    """

    def __init__(self, multi: MultiPrefixModel, metrics: Metrics, *, max_batch_size: int, max_wait_s: float,
                 max_queue: int, mix_tasks: bool = True, bf16: bool = False):
        self.multi, self.metrics, self.mix_tasks = multi, metrics, mix_tasks
        self.bf16 = bf16
        """Every forward pass under bf16 autocast (decided once, at start): faster where bf16 units are, but rows
        of a batch are then only approximately independent of their neighbours."""
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.tokenizer_lock = threading.Lock()
        """Held for every tokenizer use: fast tokenizers are not safe to share across threads unguarded."""
        self.outbox = Outbox(multi.tokenizer, self.tokenizer_lock)
        self.encoder = copy.deepcopy(multi.tokenizer)
        """The request handlers' own tokenizer: encoding a long input never holds up the worker's decoding."""
        self.encoder_lock = threading.Lock()
        """Held for every use of `encoder` (request handlers run in several threads)."""
        self.longest_token = max(map(len, multi.tokenizer.get_vocab()), default=1)
        """Characters of the vocabulary's longest token string: an input longer than max_input_tokens times this
        cannot fit, so it is refused without tokenizing it."""
        self.engine = Engine(multi.base) if Engine.can_run(multi.base) else None
        self._kwargs: dict[tuple, dict] = {}
        self._running: list[Row] = []
        self._cond = threading.Condition()
        self._waiting: list[Row] = []
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # --- request side ------------------------------------------------------------------------------
    def stepwise(self, config: GenerateConfig) -> bool:
        """Whether rows with these options are decoded step by step (and so can stream)."""
        return self.engine is not None and config.num_beams == 1

    def engine_runs(self, config: GenerateConfig) -> bool:
        """Whether rows with these options go to the decoding engine (else to the static worker)."""
        return self.engine is not None

    def submit(self, rows: list[Row]) -> None:
        """Queue all of a request's rows, or none of them (QueueFull)."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) + len(rows) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} rows are waiting and the queue holds {self.max_queue}")
            self._waiting.extend(rows)
            self._cond.notify_all()

    def cancel(self, rows: list[Row]) -> None:
        """Stop work on rows nobody waits for: waiting ones leave the queue now, running ones at the next step."""
        with self._cond:
            pending = [r for r in rows if not r.finished and not r.cancelled]
            for row in pending:
                row.cancelled = True
                if row.request is not None:
                    row.request.cancelled = True
            before = len(self._waiting)
            self._waiting = [r for r in self._waiting if not r.cancelled]
            running = sum(1 for r in pending if r.request is not None)
            self.metrics.add(cancelled_rows=before - len(self._waiting) + running)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    # --- worker side -------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.alive:
            self._stopping = False
            # One worker per decoding path; forward passes carry their prefixes in the thread's context
            # (inject.active is a contextvar), so a path can never see another's.
            targets = {"prefixtune-static": self._run_static_worker} if self.engine is None else \
                {"prefixtune-step": self._run_step_worker}
            self._threads = [threading.Thread(target=fn, name=name, daemon=True) for name, fn in targets.items()]
            for thread in self._threads:
                thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        for row in self._waiting + self._running:
            self.outbox.error(row, "the server is shutting down")
        self._waiting = []

    def _run_step_worker(self) -> None:
        while (rows := self._take(stepwise=True)) is not None:
            try:
                self.admit(rows)
                self.step()
            except Exception as err:  # not a row's failure (admit and step isolate those): keep the worker alive
                logger.exception("the step worker failed outside a step")
                for row in rows + self._running:
                    self._fail(row, err)
                self.engine.reset()
                self._running = []

    def _run_static_worker(self) -> None:
        while (rows := self._take(stepwise=False)) is not None:
            self._each_alone(self._run_static, rows)

    # --- the engine side ---------------------------------------------------------------------------
    def _precision(self):
        """The autocast every forward pass of this server runs under (autocast state is per thread, so each
        entry point that runs the model enters it)."""
        device = next(self.multi.base.parameters()).device
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _request(self, row: Row, seed: int | None, replayed: int = 0) -> Request:
        """The engine's request for a row: its callbacks send the row's events through the outbox.

        `replayed`: tokens the row already streamed before its batch failed; a rerun from the prompt makes
        the same tokens again (its seed is kept), and those are not sent twice.
        """
        key = options_key(row.config)
        if key not in self._kwargs:
            with self.tokenizer_lock:  # decoding_kwargs may decode the vocabulary once (newline tokens)
                self._kwargs[key] = decoding_kwargs(self.multi.tokenizer, row.config)
            if len(self._kwargs) > 1024:
                self._kwargs = {key: self._kwargs[key]}
        stream = row.config.num_beams == 1
        on_token = (lambda r, token: self.outbox.token(row, token) if len(r.tokens) > replayed else None) \
            if stream else None
        request = Request(row.prompt, row.prefix, self._kwargs[key], seed, on_token=on_token,
                          on_done=lambda r: self._finished(row, r))
        row.tokens = request.tokens  # the outbox decodes streamed text from the same list
        return request

    @staticmethod
    def _seed(row: Row) -> int | None:
        """The row's sampling seed; an unseeded sampling row gets a random one here, so a rerun repeats it."""
        if row.config.seed is not None or not row.config.do_sample:
            return row.config.seed
        return int(torch.randint(0, 2**62, (1,)))

    def _finished(self, row: Row, request: Request) -> None:
        row.tokens = request.outputs[0]
        self.outbox.done(row)

    @torch.no_grad()
    def admit(self, rows: list[Row]) -> None:
        """Prefill `rows` and join them to the engine's running batch. A row that cannot join fails alone:
        the engine's joins are all or nothing, so after a failed join its rows are retried one by one."""
        ready = []
        for row in rows:
            try:
                row.request = self._request(row, self._seed(row))
                ready.append(row)
            except Exception as err:  # options the decoding setup refuses: this row only
                self._fail(row, err)
        if not ready:
            return
        with self._precision():
            self._join(ready)

    def _join(self, ready: list[Row]) -> None:
        """Join `ready` together; if that fails, each row alone (a row that fails alone fails by itself)."""
        try:
            self.engine.add([row.request for row in ready])
            self._running.extend(ready)
            return
        except Exception as err:
            logger.warning("%d rows failed to join the batch together (%s: %s); retrying them one by one",
                           len(ready), type(err).__name__, err)
        joined = {id(r) for r in self.engine.requests}
        for row in ready:
            if id(row.request) not in joined:
                try:
                    self.engine.add([row.request])
                except Exception as err:
                    self._fail(row, err)
                    continue
            self._running.append(row)

    @torch.no_grad()
    def step(self) -> None:
        """One token for every running row; ended and cancelled rows leave. If the step fails, the batch's
        state cannot be trusted: each of its rows is decoded again from its prompt, alone, so only a row
        that fails by itself fails."""
        with self._precision():
            try:
                if self.engine.groups:
                    self.metrics.observe(self.metrics.batch_rows, len(self.engine.requests))
                    self.engine.step()
            except Exception:
                logger.exception("a step of %d rows failed; decoding each again alone", len(self._running))
                self._rerun_alone([r for r in self._running if not r.finished and not r.cancelled])
        self._running = [r for r in self._running if not r.finished and not r.cancelled]
        if not self._running and self.engine.groups:  # only cancelled rows' lanes are left: free them now,
            self.engine.reset()                        # not at the next request's first step

    def _rerun_alone(self, rows: list[Row]) -> None:
        """Decode each row from its prompt with nothing else in the engine (new rows wait meanwhile).

        The engine decodes a row alone exactly as in any batch, so a rerun gives the row's own answer;
        the tokens it already streamed are not sent again.
        """
        self.engine.reset()
        for row in rows:
            try:
                request = self._request(row, row.request.seed, replayed=len(row.request.tokens))
                with self._cond:  # a concurrent cancel() must reach the new request
                    row.request = request
                    request.cancelled = row.cancelled
                self.engine.add([request])
                while self.engine.groups and not self._stopping:
                    self.engine.step()
            except Exception as err:
                self._fail(row, err)
            self.engine.reset()

    def _each_alone(self, fn: Callable[[list[Row]], None], rows: list[Row]) -> None:
        """Run one batch operation; if it fails, run it for each row alone, so only a failing row fails."""
        try:
            fn(rows)
            return
        except Exception as err:
            if len(rows) == 1:
                self._fail(rows[0], err)
                return
            logger.warning("a batch of %d rows failed (%s: %s); retrying them one by one", len(rows),
                           type(err).__name__, err)
        for row in rows:
            try:
                fn([row])
            except Exception as err:
                self._fail(row, err)

    def _fail(self, row: Row, err: Exception) -> None:
        logger.error("row of task %r failed: %s: %s", row.task, type(err).__name__, err)
        self.outbox.error(row, f"generation failed: {type(err).__name__}: {err}")

    def _take(self, stepwise: bool) -> list[Row] | None:
        """Block until one worker has work: rows joining the step batch (stepwise) or a static group.

        The step worker also returns (maybe with no new rows) whenever rows are being decoded, to take
        the next step. None when stopping.
        """
        with self._cond:
            while not self._stopping:
                mine = [r for r in self._waiting if self.engine_runs(r.config) == stepwise]
                busy = stepwise and bool(self._running)
                if busy or self._ready(mine):
                    break
                self._cond.wait(mine[0].arrived + self.max_wait_s - time.monotonic() if mine else None)
            if self._stopping:
                return None
            rows = self._joining() if stepwise else self._static_group()
            taken, now = {id(r) for r in rows}, time.monotonic()
            self._waiting = [r for r in self._waiting if id(r) not in taken]
            for row in rows:
                row.admitted = now
            return rows

    def _ready(self, rows: list[Row]) -> bool:
        return bool(rows) and (len(rows) >= self.max_batch_size or time.monotonic() >= rows[0].arrived + self.max_wait_s)

    def _static_group(self) -> list[Row]:
        rows = [r for r in self._waiting if not self.engine_runs(r.config)]
        key = lambda r: (options_key(r.config), None if self.mix_tasks else r.task)  # noqa: E731
        return [r for r in rows if key(r) == key(rows[0])][: self.max_batch_size] if rows else []

    def _joining(self) -> list[Row]:
        if self.engine is None:
            return []
        rows = [r for r in self._waiting if self.engine_runs(r.config)]
        if rows and not self.mix_tasks:
            task = self._running[0].task if self._running else rows[0].task
            rows = [r for r in rows if r.task == task] if rows[0].task == task else []
        return rows[: self.max_batch_size - len(self._running)]

    @torch.no_grad()
    def _run_static(self, rows: list[Row]) -> None:
        """Models the engine cannot run: one `generate` call for rows with equal options."""
        tokenizer, config = self.multi.tokenizer, rows[0].config
        with self.tokenizer_lock:
            kwargs = decoding_kwargs(tokenizer, config)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        device = next(self.multi.base.parameters()).device
        ids, mask = left_pad([r.prompt for r in rows], tokenizer.pad_token_id)
        with self._precision():
            out = generate_ids(self.multi.base, [r.prefix for r in rows], ids.to(device), mask.to(device), **kwargs)
        self.metrics.observe(self.metrics.batch_rows, len(rows))
        enc_dec = _compat.is_encoder_decoder(self.multi.base)
        for row, seq in zip(rows, out.tolist()):
            seq = seq[1:] if enc_dec else seq[ids.shape[1]:]  # encoder-decoder outputs start with the start token
            row.tokens = seq[: seq.index(self.outbox.eos) + 1] if self.outbox.eos in seq else seq
            self.outbox.done(row)
