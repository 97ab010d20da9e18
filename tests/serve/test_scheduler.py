"""The serving engine without HTTP: rows that join, leave or share a batch decode exactly as alone."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import DECODER_ONLY, byte_tokenizer, tiny_model
from prefixtune import GenerateConfig, MultiPrefixModel, PrefixConfig, PrefixTuningModel
from prefixtune.config import TextFormat
from prefixtune.decoding import encode_sources
from prefixtune.serve.metrics import Metrics
from prefixtune.serve.rows import QueueFull, Row
from prefixtune.serve.scheduler import Batcher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["name[The Eagle]", "a", "some longer input text here", "mid", "xyz abc", "q q q", "0123456789", "hello"]


def _multi(family: str) -> MultiPrefixModel:
    """Three tasks with different prefix lengths (and one with its own text format), scaled so they matter."""
    model = tiny_model(family)
    multi = MultiPrefixModel(model, byte_tokenizer())
    for i, (length, fmt) in enumerate([(3, None), (6, TextFormat(source="{input} =>{eos}")), (1, None)]):
        ptm = PrefixTuningModel(model, PrefixConfig(prefix_length=length, reparam="table", seed=i))
        with torch.no_grad():
            for enc in ptm.encoders.values():
                enc.table.mul_(3.0)
        multi.add(f"t{i}", ptm.prefix_kv().detach(), fmt)
    return multi


class Collector:
    """Thread-safe sink of every row's events, by row number."""

    def __init__(self):
        self.events: dict[int, list[tuple[str, dict]]] = {}
        self.lock = threading.Lock()

    def emit(self, i: int):
        def put(kind: str, data: dict) -> None:
            with self.lock:
                self.events.setdefault(i, []).append((kind, data))
        return put

    def final(self, i: int) -> tuple[str, dict]:
        return self.events[i][-1]

    def finished(self, n: int) -> bool:
        with self.lock:
            return all(i in self.events and self.events[i][-1][0] in ("done", "error") for i in range(n))


def _cases(n: int) -> list[tuple[str, str, GenerateConfig]]:
    """Mixed tasks, prompt lengths and options: greedy with different lengths, one seeded sampling row."""
    cases = []
    for i in range(n):
        cfg = GenerateConfig(num_beams=1, max_new_tokens=3 + 3 * (i % 4), min_new_tokens=i % 3, block_newlines=bool(i % 2))
        if i % 5 == 4:
            cfg = GenerateConfig(num_beams=1, do_sample=True, temperature=1.3, top_p=0.9, max_new_tokens=9,
                                 min_new_tokens=0, seed=11 + i)
        cases.append((f"t{i % 3}", TEXTS[i % len(TEXTS)], cfg))
    return cases


def _rows(multi: MultiPrefixModel, cases, sink: Collector, start: int = 0, stream: bool = True) -> list[Row]:
    rows = []
    for i, (task, text, cfg) in enumerate(cases, start):
        t = multi.tasks()[task]
        ids, _ = encode_sources(multi.tokenizer, multi.base, [text], [t.text_format])
        rows.append(Row(task, t.prefix, ids[0].tolist(), cfg, sink.emit(i), stream=stream))
    return rows


def _assert_alone(multi: MultiPrefixModel, cases, sink: Collector) -> None:
    for i, (task, text, cfg) in enumerate(cases):
        kind, data = sink.final(i)
        assert kind == "done", data
        assert data["text"] == multi.generate([text], [task], cfg)[0], f"row {i} ({task}, {cfg}) differs from alone"


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_rows_joining_and_leaving_decode_as_alone(family):
    """Rows join a running batch between steps and leave when done; each equals MultiPrefixModel.generate alone."""
    multi = _multi(family)
    metrics, sink = Metrics(), Collector()
    batcher = Batcher(multi, metrics, max_batch_size=16, max_wait_s=0.01, max_queue=32)  # driven by hand
    cases = _cases(8)
    first, later = _rows(multi, cases[:4], sink), _rows(multi, cases[4:], sink, start=4)
    batcher.admit(first)
    for _ in range(3):
        batcher.step()
    running = batcher.active_rows
    assert 0 < running < 4  # one row has left, the others are mid-way
    batcher.admit(later)  # joins rows that already have 3 tokens
    assert batcher.active_rows == running + 4
    while batcher.active_rows:
        batcher.step()
    _assert_alone(multi, cases, sink)
    for i in range(len(cases)):  # one event per token; deltas (held back at incomplete characters) lead the text
        streamed = "".join(d["text"] for k, d in sink.events[i] if k == "token")
        assert sink.final(i)[1]["text"].startswith(streamed.strip())
        assert sum(k == "token" for k, _ in sink.events[i]) == sink.final(i)[1]["output_tokens"]


def test_cancelled_row_leaves_and_others_continue():
    multi = _multi("llama")
    metrics, sink = Metrics(), Collector()
    batcher = Batcher(multi, metrics, max_batch_size=16, max_wait_s=0.01, max_queue=32)
    cases = [(t, x, GenerateConfig(num_beams=1, max_new_tokens=8, min_new_tokens=8)) for t, x, _ in _cases(3)]
    cases.append(("t1", "beam me", GenerateConfig(num_beams=3, max_new_tokens=8, min_new_tokens=8)))
    rows = _rows(multi, cases, sink, stream=False)
    batcher.admit(rows)
    batcher.step()
    batcher.cancel([rows[1], rows[3]])
    batcher.step()
    assert rows[1] not in batcher._running and metrics.cancelled_rows == 2
    assert batcher.engine.lanes == 2  # the beam row's lanes left with it
    while batcher.active_rows:
        batcher.step()
    assert 3 not in sink.events
    assert 1 not in sink.events  # no event for a row nobody waits for
    for i in (0, 2):
        task, text, cfg = cases[i]
        assert sink.final(i)[1]["text"] == multi.generate([text], [task], cfg)[0]


def _run_batcher(batcher: Batcher, rows: list[Row], sink: Collector, timeout: float = 60) -> None:
    batcher.submit(rows)  # everything waits before the worker starts: the first batch takes all of it
    batcher.start()
    deadline = time.monotonic() + timeout
    while not sink.finished(len(rows)) and time.monotonic() < deadline:
        time.sleep(0.01)
    batcher.stop()
    assert sink.finished(len(rows)), "batcher did not finish in time"


def test_batcher_mixes_tasks_in_one_batch():
    multi = _multi("llama")
    metrics, sink = Metrics(), Collector()
    batcher = Batcher(multi, metrics, max_batch_size=8, max_wait_s=0.01, max_queue=16)
    cases = _cases(8) + [("t1", "beam me", GenerateConfig(num_beams=3, max_new_tokens=5, min_new_tokens=0)),
                         ("t0", "beam too", GenerateConfig(num_beams=3, max_new_tokens=5, min_new_tokens=0))]
    _run_batcher(batcher, _rows(multi, cases, sink, stream=False), sink)
    _assert_alone(multi, cases, sink)
    passes = lambda rows: metrics.total("prefixtune_batch_rows_bucket", le=f"{rows:.1f}")  # noqa: E731  (<= rows)
    assert passes(8) > passes(4)  # a pass with the 8 step rows of 3 tasks


def test_batcher_one_task_per_batch_still_equal():
    multi = _multi("llama")
    metrics, sink = Metrics(), Collector()
    batcher = Batcher(multi, metrics, max_batch_size=8, max_wait_s=0.01, max_queue=16, mix_tasks=False)
    cases = _cases(6)
    _run_batcher(batcher, _rows(multi, cases, sink, stream=False), sink)
    _assert_alone(multi, cases, sink)
    passes = metrics.total("prefixtune_batch_rows_count")
    assert passes > 0 and metrics.total("prefixtune_batch_rows_bucket", le="2.0") == passes  # 2 rows a task


def test_beam_rows_share_passes_with_streams():
    """A beam-search row joins the running batch: streams keep getting tokens while it decodes."""
    multi = _multi("llama")
    metrics, sink = Metrics(), Collector()
    batcher = Batcher(multi, metrics, max_batch_size=8, max_wait_s=0.01, max_queue=16)
    beam = [("t1", "beam me", GenerateConfig(num_beams=3, max_new_tokens=12, min_new_tokens=12))]
    steps = [(t, x, GenerateConfig(num_beams=1, max_new_tokens=4, min_new_tokens=4)) for t, x, _ in _cases(3)]
    batcher.admit(_rows(multi, beam, sink, stream=False))
    batcher.step()
    batcher.admit(_rows(multi, steps, sink, start=1))
    for _ in range(4):
        batcher.step()
    assert all(sink.final(i)[0] == "done" for i in range(1, 4)) and 0 not in sink.events  # streams done first
    while batcher.active_rows:
        batcher.step()
    _assert_alone(multi, beam + steps, sink)


def test_encoder_decoder_rows_run_static():
    multi = _multi("t5")
    metrics, sink = Metrics(), Collector()
    batcher = Batcher(multi, metrics, max_batch_size=4, max_wait_s=0.01, max_queue=16)
    assert not batcher.stepwise(GenerateConfig(num_beams=1)) and batcher.engine is None
    cases = [(t, x, GenerateConfig(num_beams=1 + i % 2, max_new_tokens=6, min_new_tokens=0))
             for i, (t, x, _) in enumerate(_cases(5))]
    _run_batcher(batcher, _rows(multi, cases, sink, stream=False), sink)
    _assert_alone(multi, cases, sink)


def test_queue_is_bounded_and_cancel_frees_it():
    multi = _multi("llama")
    metrics, sink = Metrics(), Collector()
    batcher = Batcher(multi, metrics, max_batch_size=2, max_wait_s=0.01, max_queue=3)  # not started: rows wait
    rows = _rows(multi, _cases(4), sink)
    batcher.submit(rows[:2])
    with pytest.raises(QueueFull, match="2 rows are waiting and the queue holds 3"):
        batcher.submit(rows[2:])  # all of a request's rows or none
    assert batcher.queue_depth == 2
    batcher.cancel(rows[:1])
    assert batcher.queue_depth == 1 and metrics.cancelled_rows == 1
    batcher.submit(rows[2:])
    assert batcher.queue_depth == 3


@pytest.mark.parametrize("family", ["llama", "t5"])  # the step engine, and the static worker
@pytest.mark.parametrize("bf16", [False, True])
def test_every_forward_pass_runs_in_the_servers_precision(family, bf16):
    """With bf16 every pass of the server (prefill, steps, static generate) runs under bf16 autocast; without,
    none does (autocast is per thread, so each entry point must enter it)."""
    multi = _multi(family)
    seen = []
    handle = multi.base.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    metrics, sink = Metrics(), Collector()
    batcher = Batcher(multi, metrics, max_batch_size=4, max_wait_s=0.01, max_queue=16, bf16=bf16)
    cases = [(t, x, GenerateConfig(num_beams=1 + i % 2, max_new_tokens=4, min_new_tokens=4))
             for i, (t, x, _) in enumerate(_cases(4))]
    _run_batcher(batcher, _rows(multi, cases, sink, stream=False), sink)
    handle.remove()
    assert all(sink.final(i)[0] == "done" for i in range(len(cases)))
    assert seen and set(seen) == {bf16}
