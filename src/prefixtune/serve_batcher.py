"""The serving engine: worker threads share the frozen model and decode the rows of many requests together.

Each forward pass carries as many waiting rows, of any tasks, as fit. A row (one input of a request) is:

- a step row (greedy or sampling, decoder-only model): `StepDecoder` runs one forward pass per token over
  all active rows with the KV cache and each row's own prefix; a row leaves when it ends and waiting rows
  join between steps (prefilled, then merged into the cache). A row's logits depend only on its own
  tokens, prefix and positions (`inject.position_ids`, continued per step); padding columns get an exactly
  zero attention weight. So it decodes as alone: the guarantee, and the tests, of mixed-prefix `generate`.
  transformers' own logits processors pick tokens (greedy equals `base.generate`); sampling draws from a
  generator per row, so a seeded row does not depend on its neighbours.
- a static row (beam search, or an encoder-decoder model): grouped by options, one `generate_ids` call.

Step rows and static groups run in two worker threads, so that a beam-search group does not pause streams.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessorList

from . import _compat, inject
from .config import GenerateConfig
from .generate import decoding_kwargs, generate_ids
from .multi import MultiPrefixModel
from .prefix import stack
from .serve_metrics import Metrics
from .serve_rows import Outbox, QueueFull, Row, left_pad, options_key

logger = logging.getLogger("prefixtune.serve")

class StepDecoder:
    """Greedy and sampling rows of a decoder-only model: one token per forward pass; rows join and leave."""

    def __init__(self, multi: MultiPrefixModel, outbox: Outbox, metrics: Metrics):
        self.multi, self.base, self.outbox, self.metrics = multi, multi.base, outbox, metrics
        self.device = next(self.base.parameters()).device
        params = inspect.signature(self.base.forward).parameters
        self.forward_extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # as generate does
        self._processors: dict[tuple, LogitsProcessorList] = {}
        self.reset()

    def reset(self) -> None:
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask = self.next_pos = None
        self.batch: inject.PrefixBatch | None = None

    def processors(self, row: Row) -> LogitsProcessorList:
        """transformers' own processors for this row's options, as `base.generate` would build them.

        Built per (options, prompt length): min_new_tokens counts from the prompt's end. They hold no state
        across calls, so rows with the same key share them.
        """
        key = (options_key(row.config), len(row.prompt))
        if key not in self._processors:
            with self.outbox.lock:  # decoding_kwargs may decode the vocabulary once (newline tokens)
                kwargs = decoding_kwargs(self.outbox.tokenizer, row.config)
            if len(self._processors) > 1024:
                self._processors.clear()
            self._processors[key] = _compat.generation_setup(self.base, kwargs, len(row.prompt), self.device)[1]
        return self._processors[key]

    @torch.no_grad()
    def admit(self, rows: list[Row]) -> None:
        """Prefill `rows` (one forward over their prompts), choose their first tokens, merge them in."""
        ids, mask = left_pad([r.prompt for r in rows], self.outbox.tokenizer.pad_token_id)
        offsets = torch.tensor([r.prefix.length for r in rows])
        cache = DynamicCache(config=self.base.config)
        logits = self._forward(ids, mask, inject.position_ids(mask, offsets), cache, self._stack(rows))
        self.metrics.observe(self.metrics.batch_rows, len(rows))
        for row in rows:
            row.processors = self.processors(row)
            row.generator = torch.Generator(self.device)
            if row.config.seed is None:
                row.generator.seed()
            else:
                row.generator.manual_seed(row.config.seed)
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        self._merge(rows, layers, mask, offsets + mask.sum(-1))
        self._drop(self._advance(rows, logits))

    @torch.no_grad()
    def step(self) -> None:
        """One token for every active row; cancelled and finished rows leave."""
        gone = [r for r in self.rows if r.cancelled]
        if gone:
            self.metrics.add(cancelled_rows=len(gone))
            self._drop(gone)
        if not self.rows:
            return
        ids = torch.tensor([[r.tokens[-1]] for r in self.rows])
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits = self._forward(ids, self.mask, self.next_pos[:, None], self.cache, self.batch)
        self.next_pos = self.next_pos + 1
        self.metrics.observe(self.metrics.batch_rows, len(self.rows))
        self._drop(self._advance(self.rows, logits))

    def _forward(self, ids, mask, positions, cache, batch) -> torch.Tensor:
        with inject.active(batch):
            out = self.base(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                            position_ids=positions.to(self.device), past_key_values=cache, use_cache=True,
                            **self.forward_extra)
        return out.logits[:, -1].to(dtype=torch.float32, copy=True)

    def _advance(self, rows: list[Row], logits: torch.Tensor) -> list[Row]:
        """Choose each row's next token from its logits; return the rows that have ended."""
        ended = []
        for i, row in enumerate(rows):
            seen = torch.tensor([row.prompt + row.tokens], device=self.device)
            scores = row.processors(seen, logits[i : i + 1])
            if row.config.do_sample:
                token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=row.generator))
            else:
                token = int(scores.argmax(dim=-1))
            row.tokens.append(token)
            self.outbox.token(row, token)
            if token == self.outbox.eos or len(row.tokens) >= row.config.max_new_tokens:
                ended.append(row)
                self.outbox.done(row)
        return ended

    def _stack(self, rows: list[Row]) -> inject.PrefixBatch:
        dtype = next(iter(rows[0].prefix.kv.values()))[0].dtype
        return stack([r.prefix for r in rows], self.multi.slots, self.multi.shapes, device=self.device, dtype=dtype)

    def _merge(self, rows: list[Row], layers: list, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Append prefilled rows to the batch, left-padding whichever cache is shorter (masked columns)."""
        if self.rows:
            width = max(self.mask.shape[1], mask.shape[1])
            a, b = width - self.mask.shape[1], width - mask.shape[1]
            layers = [(torch.cat([F.pad(k0, (0, 0, a, 0)), F.pad(k1, (0, 0, b, 0))]),
                       torch.cat([F.pad(v0, (0, 0, a, 0)), F.pad(v1, (0, 0, b, 0))]))
                      for (k0, v0), (k1, v1) in zip(self._layers(), layers)]
            mask = torch.cat([F.pad(self.mask, (a, 0)), F.pad(mask, (b, 0))])
            next_pos = torch.cat([self.next_pos, next_pos])
        self._install(self.rows + rows, layers, mask, next_pos)

    def _drop(self, gone: list[Row]) -> None:
        if not gone:
            return
        ids = {id(r) for r in gone}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in ids]
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        self._install([self.rows[i] for i in keep], [(k[index], v[index]) for k, v in self._layers()],
                      self.mask[keep], self.next_pos[keep])

    def _layers(self) -> list:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _install(self, rows: list[Row], layers: list, mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Make `rows` the batch: cut cache columns that are padding in every row, rebuild the prefix batch."""
        if not rows:
            self.reset()
            return
        start = int(mask.any(dim=0).long().argmax())
        self.cache = DynamicCache([(k[:, :, start:], v[:, :, start:]) for k, v in layers], config=self.base.config)
        self.rows, self.mask, self.next_pos, self.batch = rows, mask[:, start:], next_pos, self._stack(rows)


class Batcher:
    """The bounded queue of waiting rows and the worker thread that batches them.

    An idle worker waits up to `max_wait_s` after the oldest row arrived (or until `max_batch_size` rows
    wait) before starting; a busy one takes waiting rows into the running batch between steps. With
    `mix_tasks=False` a batch holds one task at a time (how a server that swaps adapters per batch works):
    rows of the running task join only while the oldest waiting row has that task too.
    """

    def __init__(self, multi: MultiPrefixModel, metrics: Metrics, *, max_batch_size: int, max_wait_s: float,
                 max_queue: int, mix_tasks: bool = True):
        self.multi, self.metrics, self.mix_tasks = multi, metrics, mix_tasks
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_s, max_queue
        self.tokenizer_lock = threading.Lock()
        """Held for every tokenizer use: fast tokenizers are not safe to share across threads unguarded."""
        self.outbox = Outbox(multi.tokenizer, self.tokenizer_lock, metrics)
        stepping = not _compat.is_encoder_decoder(multi.base)
        self.decoder = StepDecoder(multi, self.outbox, metrics) if stepping else None
        self._cond = threading.Condition()
        self._waiting: list[Row] = []
        self._stopping = False
        self._threads: list[threading.Thread] = []

    # --- request side ------------------------------------------------------------------------------
    def stepwise(self, config: GenerateConfig) -> bool:
        """Whether rows with these options are decoded step by step (and so can stream)."""
        return self.decoder is not None and config.num_beams == 1

    def submit(self, rows: list[Row]) -> None:
        """Queue all of a request's rows, or none of them (QueueFull)."""
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            if len(self._waiting) + len(rows) > self.max_queue:
                raise QueueFull(f"{len(self._waiting)} rows are waiting and the queue holds {self.max_queue}")
            self._waiting.extend(rows)
            self.metrics.add(input_tokens=sum(len(r.prompt) for r in rows))
            self._cond.notify_all()

    def cancel(self, rows: list[Row]) -> None:
        """Stop work on rows nobody waits for: waiting ones leave the queue now, running ones at the next step."""
        with self._cond:
            pending = [r for r in rows if not r.finished]
            for row in pending:
                row.cancelled = True
            before = len(self._waiting)
            self._waiting = [r for r in self._waiting if not r.cancelled]
            self.metrics.add(cancelled_rows=before - len(self._waiting))

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_rows(self) -> int:
        return len(self.decoder.rows) if self.decoder is not None else 0

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    # --- worker side -------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.alive:
            self._stopping = False
            # Two workers, so that a long beam-search group never pauses the rows being decoded step by
            # step (streams keep flowing). Both only read the weights; each forward pass carries its own
            # prefixes in its thread's context (inject.active is a contextvar), so they cannot mix.
            targets = {"prefixtune-static": self._run_static_worker}
            if self.decoder is not None:
                targets["prefixtune-step"] = self._run_step_worker
            self._threads = [threading.Thread(target=fn, name=name, daemon=True) for name, fn in targets.items()]
            for thread in self._threads:
                thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)
        for row in self._waiting + (self.decoder.rows if self.decoder else []):
            self.outbox.error(row, "the server is shutting down")
        self._waiting = []

    def _run_step_worker(self) -> None:
        while (rows := self._take(stepwise=True)) is not None:
            self._safely(self.decoder.admit, rows, rows + self.decoder.rows)
            self._safely(lambda _: self.decoder.step(), self.decoder.rows, self.decoder.rows)

    def _run_static_worker(self) -> None:
        while (rows := self._take(stepwise=False)) is not None:
            self._safely(self._run_static, rows, rows)

    def _safely(self, fn: Callable[[list[Row]], None], rows: list[Row], involved: list[Row]) -> None:
        """Run one batch operation; a failure fails its rows (with the reason) instead of the server."""
        if not rows:
            return
        try:
            fn(rows)
        except Exception as err:
            logger.exception("batch of %d rows failed", len(involved))
            for row in list(involved):
                self.outbox.error(row, f"generation failed: {type(err).__name__}: {err}")
            if self.decoder is not None and any(r in involved for r in self.decoder.rows):
                self.decoder.reset()

    def _take(self, stepwise: bool) -> list[Row] | None:
        """Block until one worker has work: rows joining the step batch (stepwise) or a static group.

        The step worker also returns (maybe with no new rows) whenever rows are being decoded, to take
        the next step. None when stopping.
        """
        with self._cond:
            while not self._stopping:
                mine = [r for r in self._waiting if self.stepwise(r.config) == stepwise]
                busy = stepwise and bool(self.decoder.rows)
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
        rows = [r for r in self._waiting if not self.stepwise(r.config)]
        key = lambda r: (options_key(r.config), None if self.mix_tasks else r.task)  # noqa: E731
        return [r for r in rows if key(r) == key(rows[0])][: self.max_batch_size] if rows else []

    def _joining(self) -> list[Row]:
        if self.decoder is None:
            return []
        rows = [r for r in self._waiting if self.stepwise(r.config)]
        if rows and not self.mix_tasks:
            task = self.decoder.rows[0].task if self.decoder.rows else rows[0].task
            rows = [r for r in rows if r.task == task] if rows[0].task == task else []
        return rows[: self.max_batch_size - len(self.decoder.rows)]

    @torch.no_grad()
    def _run_static(self, rows: list[Row]) -> None:
        """Beam search (or an encoder-decoder model): one `generate` call for rows with equal options."""
        tokenizer, config = self.multi.tokenizer, rows[0].config
        with self.tokenizer_lock:
            kwargs = decoding_kwargs(tokenizer, config)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        device = next(self.multi.base.parameters()).device
        ids, mask = left_pad([r.prompt for r in rows], tokenizer.pad_token_id)
        out = generate_ids(self.multi.base, [r.prefix for r in rows], ids.to(device), mask.to(device), **kwargs)
        self.metrics.observe(self.metrics.batch_rows, len(rows))
        enc_dec = _compat.is_encoder_decoder(self.multi.base)
        for row, seq in zip(rows, out.tolist()):
            seq = seq[1:] if enc_dec else seq[ids.shape[1]:]  # encoder-decoder outputs start with the start token
            row.tokens = seq[: seq.index(self.outbox.eos) + 1] if self.outbox.eos in seq else seq
            self.outbox.done(row)
