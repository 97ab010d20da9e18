"""The prefix-store watch (`store_poll_s`): prefixes added, replaced or deleted on disk reach the task cache
without a restart; half-written prefixes keep the old task. No Ray needed."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest

from conftest import byte_tokenizer, tiny_model
from prefixtune import MultiPrefixModel
from prefixtune.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from prefixtune.serve import ServeSettings, create_app
from prefixtune.serve.metrics import Metrics
from prefixtune.serve.storewatch import StoreWatch
from prefixtune.serve.taskcache import TaskCache
from test_app import TIMEOUT, LiveServer, save_prefix, wait_until

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def multi():
    return MultiPrefixModel(tiny_model("llama"), byte_tokenizer())


def watched(root, multi, max_tasks=None, pins=()):
    for name in list(multi.tasks()):
        multi.remove(name)
    cache = TaskCache(multi, Metrics(), root, max_tasks, pins)
    cache.start()
    return cache, StoreWatch(cache, 60.0)


def lengths(cache) -> dict[str, int]:
    return {name: t.prefix.length for name, t in cache.multi.tasks().items()}


def replace(path, length: int, seed: int) -> None:
    """A new prefix written beside the old one and swapped in, as a deploy would; stamps forced to differ
    (two writes within the filesystem's mtime resolution would otherwise look the same)."""
    save_prefix(path.with_name(path.name + ".new"), length, seed)
    shutil.rmtree(path)
    os.rename(path.with_name(path.name + ".new"), path)
    st = (path / CONFIG_NAME).stat()
    os.utime(path / CONFIG_NAME, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_added_replaced_deleted(tmp_path, multi):
    save_prefix(tmp_path / "a", 2, 0)
    cache, watch = watched(tmp_path, multi)
    assert watch.poll() == {"loaded": [], "unloaded": [], "failed": []}  # nothing changed since start
    save_prefix(tmp_path / "b", 3, 1)
    assert watch.poll()["loaded"] == ["b"] and lengths(cache) == {"a": 2, "b": 3}
    replace(tmp_path / "a", 5, 2)
    assert watch.poll()["loaded"] == ["a"] and lengths(cache) == {"a": 5, "b": 3}
    shutil.rmtree(tmp_path / "b")
    assert watch.poll()["unloaded"] == ["b"] and lengths(cache) == {"a": 5}
    save_prefix(tmp_path / "b", 4, 3)  # back again: deleted on disk is not DELETE, so it loads
    assert watch.poll()["loaded"] == ["b"] and lengths(cache) == {"a": 5, "b": 4}


def test_half_written_prefix_keeps_the_old_one_until_whole(tmp_path, multi):
    save_prefix(tmp_path / "a", 2, 0)
    cache, watch = watched(tmp_path, multi)
    save_prefix(tmp_path / "spare", 6, 1)
    weights = (tmp_path / "spare" / WEIGHTS_NAME).read_bytes()
    shutil.copy(tmp_path / "spare" / CONFIG_NAME, tmp_path / "a" / CONFIG_NAME)
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes(weights[: len(weights) // 2])  # a copy caught mid-way
    result = watch.poll()
    assert "a" in result["failed"] and lengths(cache)["a"] == 2
    (tmp_path / "a" / WEIGHTS_NAME).write_bytes(weights)
    assert "a" in watch.poll()["loaded"] and lengths(cache)["a"] == 6


def test_bounded_cache_leaves_new_tasks_to_load_on_demand(tmp_path, multi):
    save_prefix(tmp_path / "a", 2, 0)
    cache, watch = watched(tmp_path, multi, max_tasks=2)
    cache.get("a")
    save_prefix(tmp_path / "b", 3, 1)
    replace(tmp_path / "a", 4, 2)
    assert watch.poll()["loaded"] == ["a"] and lengths(cache) == {"a": 4}  # b is not resident until asked for
    assert cache.get("b").prefix.length == 3


def test_deleted_through_the_api_and_explicit_tasks_are_left_alone(tmp_path, multi):
    save_prefix(tmp_path / "a", 2, 0)
    save_prefix(tmp_path / "b", 2, 1)
    save_prefix(tmp_path / "elsewhere", 5, 2)
    cache, watch = watched(tmp_path, multi)
    multi.add("b", tmp_path / "elsewhere")  # as --prefix b=PATH would: not from DIR/b
    cache.remove("a")
    replace(tmp_path / "a", 3, 3)
    replace(tmp_path / "b", 3, 4)
    shutil.rmtree(tmp_path / "elsewhere")  # DIR/elsewhere goes, "elsewhere" unloads; b keeps its copy
    assert watch.poll() == {"loaded": [], "unloaded": ["elsewhere"], "failed": []}
    assert lengths(cache) == {"b": 5}


def test_live_server_drops_a_deleted_prefix_within_the_poll(tmp_path):
    save_prefix(tmp_path / "a", 2, 0)
    save_prefix(tmp_path / "b", 3, 1)
    settings = ServeSettings(prefix_dir=tmp_path, store_poll_s=0.1, default_new_tokens=4)
    app = create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()), settings)
    with LiveServer(app) as url, httpx.Client(base_url=url, timeout=TIMEOUT) as client:
        names = lambda: [t["name"] for t in client.get("/v1/tasks").json()["tasks"]]  # noqa: E731
        assert names() == ["a", "b"]
        shutil.rmtree(tmp_path / "b")
        wait_until(lambda: names() == ["a"], timeout=10)
        replace(tmp_path / "a", 7, 2)
        wait_until(lambda: client.get("/v1/tasks").json()["tasks"][0]["prefix_length"] == 7, timeout=10)
        assert client.post("/v1/generate", json={"task": "a", "input": "x"}).status_code == 200


def test_store_poll_needs_a_prefix_dir():
    with pytest.raises(ValueError, match="store_poll_s=0.5 watches the prefix directory"):
        create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()), ServeSettings(store_poll_s=0.5))


def test_flags_poll_by_default_only_with_ray_and_replicas_need_ray(tmp_path):
    import argparse

    from prefixtune.serve import add_cli_arguments, settings_from_args

    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    flags = ["--prefix-dir", str(tmp_path)]
    assert settings_from_args(parser.parse_args(flags)).store_poll_s == 0
    assert settings_from_args(parser.parse_args([*flags, "--ray"])).store_poll_s == 2.0
    assert settings_from_args(parser.parse_args([*flags, "--ray", "--store-poll-s", "0"])).store_poll_s == 0
    with pytest.raises(ValueError, match="--replicas 2 / --replica-cpus 1.0 need --ray"):
        settings_from_args(parser.parse_args([*flags, "--replicas", "2"]))
    with pytest.raises(ValueError, match="store_poll_s must be >= 0"):
        settings_from_args(parser.parse_args([*flags, "--store-poll-s", "-1"]))
