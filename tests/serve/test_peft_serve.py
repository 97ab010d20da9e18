"""PEFT PrefixTuning checkpoints as served tasks: in --prefix-dir at start, by PUT, in the --max-tasks cache and in
the store watch, their text format the --peft-source-format one. Every checkpoint is written by PEFT itself, and
every served text is checked against `MultiPrefixModel.generate` on the same prefix."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil

import httpx
import pytest
import torch

peft = pytest.importorskip("peft")

from conftest import byte_tokenizer, save_tiny, tiny_model  # noqa: E402
from prefixtune import MultiPrefixModel  # noqa: E402
from prefixtune.config import TextFormat  # noqa: E402
from prefixtune.peft_import import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME  # noqa: E402
from prefixtune.serve import ServeSettings, add_cli_arguments, cli_main, create_app, settings_from_args  # noqa: E402
from prefixtune.serve.metrics import Metrics  # noqa: E402
from prefixtune.serve.storewatch import StoreWatch  # noqa: E402
from prefixtune.serve.taskcache import TaskCache  # noqa: E402
from test_app import TIMEOUT, LiveServer, alone, save_prefix  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FMT = "Q: {input} A:{eos}"
"""The served PEFT tasks' source template: not the default, so a task that ignored it would answer otherwise."""


def peft_dir(path, seed: int, family: str = "llama", length: int = 4) -> None:
    """A PEFT PrefixTuning checkpoint saved by PEFT, random (scaled) prefix, for tiny `family` (served: llama)."""
    pm = peft.get_peft_model(tiny_model(family), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=length, prefix_projection=False))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 3.0)
    pm.save_pretrained(path)


def break_peft(path, how: str) -> None:
    """A PEFT checkpoint damaged as files get damaged, or made for another model."""
    if how == "wrong-model":
        peft_dir(path, 9, family="gpt2")
        return
    peft_dir(path, 9)
    weights, config = path / PEFT_WEIGHTS_NAME, path / PEFT_CONFIG_NAME
    if how == "truncated":
        weights.write_bytes(weights.read_bytes()[:40])
    elif how == "not-json":
        config.write_text("{broken", encoding="utf-8")
    elif how == "nan":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(weights))
        tensors["prompt_embeddings"][0, 0] = float("nan")
        save_file(tensors, str(weights))


def reference(root, names) -> MultiPrefixModel:
    ref = MultiPrefixModel(tiny_model("llama"), byte_tokenizer())
    for name in names:
        ref.add(name, root / name, TextFormat(source=FMT) if (root / name / PEFT_CONFIG_NAME).is_file() else None)
    return ref


REQUESTS = [{"input": "name[Eagle]", "max_new_tokens": 8}, {"input": "beam me", "num_beams": 3, "max_new_tokens": 6},
            {"input": ["x", "mid size input"], "max_new_tokens": 10, "min_new_tokens": 10}]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefixes")
    save_prefix(root / "alpha", 3, 0)
    peft_dir(root / "peft", 1)
    break_peft(root / "peft-broken", "truncated")
    settings = ServeSettings(prefix_dir=root, peft_source_format=FMT, max_batch_size=4, max_wait_ms=20,
                             max_new_tokens=64, default_new_tokens=16, max_input_tokens=40, max_inputs_per_request=4)
    app = create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()), settings)
    with LiveServer(app) as url:
        yield argparse.Namespace(url=url, app=app, root=root, ref=reference(root, ["alpha", "peft"]))


def test_peft_dir_in_prefix_dir_is_served_like_multi_generate(live):
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        tasks = {t["name"]: t for t in c.get("/v1/tasks").json()["tasks"]}
        assert sorted(tasks) == ["alpha", "peft"]  # the broken PEFT dir was skipped at start
        assert tasks["peft"]["prefix_length"] == 4 and tasks["peft"]["source"] == "prefix_dir/peft"
        for req in REQUESTS:
            body = c.post("/v1/generate", json={**req, "task": "peft"}).json()
            assert [o["text"] for o in body["outputs"]] == alone(live.ref, {**req, "task": "peft"}), req
    default = MultiPrefixModel(tiny_model("llama"), byte_tokenizer())
    default.add("peft", live.root / "peft")  # the default text format instead of FMT: other answers
    assert alone(default, {**REQUESTS[2], "task": "peft"}) != alone(live.ref, {**REQUESTS[2], "task": "peft"})


def test_put_loads_and_reloads_a_peft_dir(live):
    req = {**REQUESTS[0], "task": "peft-new"}
    with httpx.Client(base_url=live.url, timeout=TIMEOUT) as c:
        peft_dir(live.root / "peft-new", 2, length=5)
        added = c.put("/v1/tasks/peft-new")
        assert added.status_code == 201 and added.json()["prefix_length"] == 5, added.text
        first = c.post("/v1/generate", json=req).json()["outputs"][0]["text"]
        assert first == alone(reference(live.root, ["peft-new"]), req)[0]
        shutil.rmtree(live.root / "peft-new")
        peft_dir(live.root / "peft-new", 3, length=2)
        reloaded = c.put("/v1/tasks/peft-new")
        assert reloaded.status_code == 200 and reloaded.json()["prefix_length"] == 2, reloaded.text
        second = c.post("/v1/generate", json=req).json()["outputs"][0]["text"]
        assert second == alone(reference(live.root, ["peft-new"]), req)[0]
        assert c.delete("/v1/tasks/peft-new").status_code == 200


@pytest.mark.parametrize("how", ["truncated", "not-json", "nan", "wrong-model"])
def test_broken_peft_dir_put_is_422_and_harms_no_other_task(live, how):
    name = f"bad-{how}"
    break_peft(live.root / name, how)
    innocents = [{**REQUESTS[2], "task": "peft"}, {**REQUESTS[0], "task": "alpha", "max_new_tokens": 30}]

    async def run():
        async with httpx.AsyncClient(base_url=live.url, timeout=TIMEOUT) as client:
            running = [asyncio.create_task(client.post("/v1/generate", json=r)) for r in innocents]
            await asyncio.sleep(0.05)
            put = await client.put(f"/v1/tasks/{name}")
            return put, await asyncio.gather(*running), await client.get("/v1/tasks")

    put, answers, listing = asyncio.run(run())
    assert put.status_code == 422 and put.json()["error"]["type"] == "invalid_prefix", put.text
    assert name in put.json()["error"]["message"] and str(live.root) not in put.text
    for req, resp in zip(innocents, answers):
        assert resp.status_code == 200 and [o["text"] for o in resp.json()["outputs"]] == alone(live.ref, req), req
    assert sorted(t["name"] for t in listing.json()["tasks"]) == ["alpha", "peft"]


def test_start_skips_a_broken_peft_dir_with_a_warning(tmp_path, caplog):
    peft_dir(tmp_path / "good", 1)
    break_peft(tmp_path / "bad", "not-json")
    with caplog.at_level(logging.WARNING, logger="prefixtune.serve"):
        app = create_app(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()),
                         ServeSettings(prefix_dir=tmp_path, peft_source_format=FMT))
    tasks = app.state.tasks.multi.tasks()
    assert sorted(tasks) == ["good"] and tasks["good"].text_format.source == FMT
    assert any("skipping" in r.message and "bad" in r.message and "not valid JSON" in r.getMessage()
               for r in caplog.records), caplog.text


def test_task_cache_loads_peft_on_demand_and_evicts_it(tmp_path):
    save_prefix(tmp_path / "alpha", 3, 0)
    peft_dir(tmp_path / "peft", 1)
    metrics = Metrics()
    cache = TaskCache(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()), metrics, tmp_path, max_tasks=1,
                      peft_format=TextFormat(source=FMT))
    cache.start()
    assert cache.multi.tasks() == {}
    task = cache.get("peft")
    assert task.text_format.source == FMT and task.prefix.length == 4
    ref = reference(tmp_path, ["peft"]).tasks()["peft"].prefix
    assert all(torch.equal(task.prefix.kv[s][0], ref.kv[s][0]) for s in ref.kv)
    cache.get("alpha")
    assert sorted(cache.multi.tasks()) == ["alpha"]  # peft was evicted: it can be loaded again from disk
    assert cache.get("peft").prefix.length == 4 and metrics.cache_misses._value.get() == 3


def _bump(path) -> None:
    """Stamps forced to differ (two writes within the filesystem's mtime resolution would look the same)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def test_store_watch_sees_peft_files(tmp_path):
    root = tmp_path / "store"
    save_prefix(root / "alpha", 3, 0)
    cache = TaskCache(MultiPrefixModel(tiny_model("llama"), byte_tokenizer()), Metrics(), root,
                      peft_format=TextFormat(source=FMT))
    cache.start()
    watch = StoreWatch(cache, 60.0)
    peft_dir(root / "peft", 1)
    assert watch.poll()["loaded"] == ["peft"] and cache.multi.tasks()["peft"].text_format.source == FMT
    before = cache.multi.tasks()["peft"].prefix
    peft_dir(tmp_path / "other", 2)  # new weights only, the same size; adapter_config.json untouched
    shutil.copyfile(tmp_path / "other" / PEFT_WEIGHTS_NAME, root / "peft" / PEFT_WEIGHTS_NAME)
    _bump(root / "peft" / PEFT_WEIGHTS_NAME)
    assert watch.poll()["loaded"] == ["peft"]
    after = cache.multi.tasks()["peft"].prefix
    assert not torch.equal(after.kv[("self", 0)][0], before.kv[("self", 0)][0])
    (root / "peft" / PEFT_WEIGHTS_NAME).write_bytes(b"half")  # a copy in progress: the old task stays
    assert watch.poll()["failed"] == ["peft"] and cache.multi.tasks()["peft"].prefix is after
    shutil.rmtree(root / "peft")
    assert watch.poll()["unloaded"] == ["peft"] and sorted(cache.multi.tasks()) == ["alpha"]


def test_serve_flag_is_the_shared_peft_source_format(tmp_path, capsys):
    """--peft-source-format reaches ServeSettings and both kinds of serve tasks (--prefix-dir, --prefix)."""
    from prefixtune.serve.app import build_app

    peft_dir(tmp_path / "dir" / "peft", 1)
    peft_dir(tmp_path / "extra", 2)
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    default = settings_from_args(parser.parse_args(["--prefix-dir", str(tmp_path / "dir")]))
    assert default.peft_source_format == ServeSettings().peft_source_format == TextFormat().source
    argv = ["--model", save_tiny(tmp_path / "model"), "--prefix-dir", str(tmp_path / "dir"),
            "--prefix", f"extra={tmp_path / 'extra'}", "--peft-source-format", FMT]
    tasks = build_app(parser.parse_args(argv)).state.tasks.multi.tasks()
    assert {name: t.text_format.source for name, t in tasks.items()} == {"peft": FMT, "extra": FMT}
    assert cli_main(parser.parse_args([*argv[:-1], "no input field"])) == 2
    assert "peft_source_format" in capsys.readouterr().err
