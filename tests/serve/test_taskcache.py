"""The bounded task cache: least-recently-used eviction, loading on demand, pins, and rows that keep
decoding with a prefix evicted under them."""

from __future__ import annotations

import argparse

import httpx
import pytest

from conftest import byte_tokenizer, tiny_model
from prefixtune import GenerateConfig, MultiPrefixModel
from prefixtune.decoding import encode_sources
from prefixtune.serve import ServeSettings, add_cli_arguments, create_app, settings_from_args
from prefixtune.serve.metrics import Metrics
from prefixtune.serve.rows import Row
from prefixtune.serve.scheduler import Batcher
from prefixtune.serve.schema import ApiError
from prefixtune.serve.taskcache import TaskCache
from test_app import TIMEOUT, LiveServer, save_prefix
from test_scheduler import Collector

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NAMES = ["t0", "t1", "t2", "t3", "t4"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefixes")
    for i, name in enumerate(NAMES):
        save_prefix(root / name, 2 + i % 3, i)
    return root


def cache_of(root, max_tasks=None, pins=(), multi=None) -> TaskCache:
    multi = multi or MultiPrefixModel(tiny_model("llama"), byte_tokenizer())
    cache = TaskCache(multi, Metrics(), root, max_tasks, pins)
    cache.start()
    return cache


def counts(cache: TaskCache) -> tuple[int, int, int]:
    m = cache.metrics
    return tuple(int(m.total(f"prefixtune_task_cache_{k}_total")) for k in ("hits", "misses", "evictions"))


def test_unbounded_loads_everything_at_start(root):
    cache = cache_of(root)
    assert sorted(cache.multi.tasks()) == NAMES
    cache.get("t3")
    assert counts(cache) == (1, 0, 0)


def test_least_recently_used_is_evicted_and_reloads_on_demand(root):
    cache = cache_of(root, max_tasks=2)
    assert cache.multi.tasks() == {}  # nothing loads before it is asked for
    for name in ["t0", "t1", "t0", "t2"]:  # t1 is the least recently used when t2 arrives
        cache.get(name)
    assert sorted(cache.multi.tasks()) == ["t0", "t2"] and counts(cache) == (1, 3, 1)
    reloaded = cache.get("t1")
    assert sorted(cache.multi.tasks()) == ["t1", "t2"] and counts(cache) == (1, 4, 2)
    assert reloaded.prefix.length == 3 and reloaded.source.endswith("t1")


def test_pins_and_explicit_tasks_are_never_evicted(root, tmp_path):
    multi = MultiPrefixModel(tiny_model("llama"), byte_tokenizer())
    save_prefix(tmp_path / "elsewhere", 2, 9)
    multi.add("extra", tmp_path / "elsewhere")  # --prefix NAME=PATH: cannot be reloaded from the directory
    cache = cache_of(root, max_tasks=3, pins=["t4"], multi=multi)
    assert sorted(multi.tasks()) == ["extra", "t4"]
    for name in NAMES[:4]:
        cache.get(name)
    assert sorted(multi.tasks()) == ["extra", "t3", "t4"] and counts(cache)[2] == 3


def test_unevictable_tasks_must_leave_room(root):
    with pytest.raises(ValueError, match="--max-tasks 2 leaves no room"):
        cache_of(root, max_tasks=2, pins=["t0", "t1"])
    with pytest.raises(ValueError, match="--pin missing"):
        cache_of(root, max_tasks=2, pins=["missing"])


def test_unknown_bad_and_escaping_names_are_refused(root, tmp_path):
    cache = cache_of(root, max_tasks=2)
    save_prefix(tmp_path / "outside", 2, 7)
    (root / "sneaky").symlink_to(tmp_path / "outside", target_is_directory=True)
    try:
        for name, status, kind, words in [("nope", 404, "unknown_task", "'nope'"),
                                          ("../t0", 400, "invalid_task_name", "'../t0'"),
                                          ("sneaky", 400, "invalid_task_name", "outside the prefix directory")]:
            with pytest.raises(ApiError) as caught:
                cache.get(name)
            assert (caught.value.status, caught.value.kind) == (status, kind) and words in caught.value.message
    finally:
        (root / "sneaky").unlink()
    assert cache.multi.tasks() == {} and counts(cache) == (0, 0, 0)


def test_deleted_task_stays_unloaded_until_put(root):
    cache = cache_of(root, max_tasks=2)
    cache.get("t0")
    cache.remove("t0")
    with pytest.raises(ApiError, match="PUT /v1/tasks/t0"):
        cache.get("t0")
    cache.remove("t1")  # on disk, not resident: retired all the same
    with pytest.raises(ApiError) as caught:
        cache.remove("t1")
    assert caught.value.status == 404
    cache.load("t0")
    assert cache.get("t0").name == "t0"


def test_rows_decoding_with_an_evicted_task_finish_unchanged(root):
    """Loading t2 and t3 evicts t0, whose row is decoding, and t1, whose row is queued: both keep their prefixes."""
    multi = MultiPrefixModel(tiny_model("llama"), byte_tokenizer())
    cache, sink = cache_of(root, max_tasks=2, multi=multi), Collector()
    batcher = Batcher(multi, cache.metrics, max_batch_size=8, max_wait_s=0.01, max_queue=8)  # driven by hand
    config = GenerateConfig(num_beams=1, max_new_tokens=12, min_new_tokens=12)

    def row(i: int, name: str) -> Row:
        task = cache.get(name)
        ids, _ = encode_sources(multi.tokenizer, multi.base, [f"input {i}"], [task.text_format])
        return Row(name, task.prefix, ids[0].tolist(), config, sink.emit(i))

    decoding, queued = row(0, "t0"), row(1, "t1")
    batcher.admit([decoding])
    batcher.step()
    later = [row(2, "t2"), row(3, "t3")]
    assert sorted(multi.tasks()) == ["t2", "t3"] and counts(cache)[2] == 2
    batcher.admit([queued, *later])
    while not sink.finished(4):
        batcher.step()
    ref = MultiPrefixModel(tiny_model("llama"), byte_tokenizer())
    for i, name in enumerate(["t0", "t1", "t2", "t3"]):
        ref.add(name, root / name)
        kind, data = sink.final(i)
        assert kind == "done" and data["text"] == ref.generate([f"input {i}"], [name], config)[0], name


def test_http_routes_load_on_demand_within_the_bound(root):
    app = create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()),
                     ServeSettings(prefix_dir=root, max_tasks=2, pin=("t4",), default_new_tokens=4))
    with LiveServer(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as c:
        for name in ["t0", "t1", "t2"]:
            assert c.post("/v1/generate", json={"task": name, "input": "x"}).status_code == 200
        completion = c.post("/v1/completions", json={"model": "t3", "prompt": "x", "max_tokens": 3, "temperature": 0})
        assert completion.status_code == 200, completion.text
        assert [t["name"] for t in c.get("/v1/tasks").json()["tasks"]] == ["t3", "t4"]
        assert [m["id"] for m in c.get("/v1/models").json()["data"][1:]] == ["t3", "t4"]
        assert c.put("/v1/tasks/t0").status_code == 201 and c.delete("/v1/tasks/t0").json() == {"deleted": "t0"}
        gone = c.post("/v1/generate", json={"task": "t0", "input": "x"})
        assert gone.status_code == 404 and "PUT /v1/tasks/t0" in gone.json()["error"]["message"]
    assert counts(app.state.tasks) == (0, 4, 4)  # t1, t2, t3 and the PUT of t0 each evicted the least recently used


def test_cache_flags(tmp_path):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    args = parser.parse_args(["--prefix-dir", str(tmp_path), "--max-tasks", "8", "--pin", "a", "--pin", "b.2",
                              "--log-format", "json"])
    settings = settings_from_args(args)
    assert (settings.max_tasks, settings.pin, settings.log_format) == (8, ("a", "b.2"), "json")
    assert settings_from_args(parser.parse_args(["--prefix-dir", str(tmp_path)])).max_tasks is None
    for bad, words in [(dict(max_tasks=0), "max_tasks must be >= 1"), (dict(pin=("../x",)), "'../x' is not a task"),
                       (dict(log_format="xml"), "log_format must be one of")]:
        with pytest.raises(ValueError, match=words):
            ServeSettings(**bad).validate()
