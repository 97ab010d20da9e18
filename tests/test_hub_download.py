"""Hub ids are downloaded (safetensors, config and tokenizer files only), at the asked revision, then load from
the cache with the Hub gone; an id the Hub does not have, or one not cached while offline, fails in one line,
quickly. Against a fake Hub on 127.0.0.1 (tests/fake_hub.py), each load in a fresh process: huggingface_hub
reads HF_ENDPOINT and HF_HOME once, at import."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import save_tiny
from fake_hub import FakeHub
from prefixtune.base_model import load_base_model

REPO = "tinyorg/tiny-llama"
MAIN, V1 = "a" * 40, "b" * 40
IDS = [[5, 9, 2, 7]]

_LOAD = """
import json, sys, torch
from prefixtune.config import ModelConfig
from prefixtune.base_model import load
try:
    model, tok = load(ModelConfig(**json.loads(sys.argv[1])))
except ValueError as err:  # ModelNotFoundError, ModelFilesError: what the CLI prints as one line
    print("error: " + str(err), file=sys.stderr)
    raise SystemExit(3)
with torch.no_grad():
    torch.save(model(torch.tensor(%r)).logits, sys.argv[2])
""" % (IDS,)


def _env(hub_url: str, home, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_ENDPOINT": hub_url, "HF_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path),
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", **extra}


def _load(tmp_path, env: dict, timeout: float = 300, **cfg):
    """(returncode, stderr, logits or None, seconds) of loading ModelConfig(**cfg) in a fresh process."""
    out = tmp_path / "logits.pt"
    out.unlink(missing_ok=True)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", _LOAD, json.dumps({"device": "cpu", **cfg}), str(out)], env=env,
                         capture_output=True, text=True, timeout=timeout)
    logits = torch.load(out) if run.returncode == 0 else None
    return run.returncode, run.stderr, logits, time.monotonic() - start


def _logits(path: str) -> torch.Tensor:
    model, _ = load_base_model(path)
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits


@pytest.fixture
def hub(tmp_path):
    """A fake Hub with REPO: main is a seed-0 model plus a pickle and a .py file (neither may be fetched),
    tag v1 a seed-1 model."""
    fake = FakeHub()
    fake.add(REPO, MAIN, save_tiny(tmp_path / "src-main", "llama", seed=0), refs=("main",),
             extra={"pytorch_model.bin": b"not to be fetched", "modeling_evil.py": b"raise SystemExit(9)"})
    fake.add(REPO, V1, save_tiny(tmp_path / "src-v1", "llama", seed=1), refs=("v1",))
    with fake:
        yield fake


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_hub_id_downloads_safe_files_then_loads_from_the_cache_with_the_hub_gone(hub, tmp_path):
    env = _env(hub.url, tmp_path / "home")
    code, err, logits, _ = _load(tmp_path, env, model=REPO)
    assert code == 0, err
    torch.testing.assert_close(logits, _logits(str(tmp_path / "src-main")), rtol=0, atol=0)
    fetched = hub.files_fetched()
    assert "model.safetensors" in fetched and "config.json" in fetched and "tokenizer.json" in fetched
    assert not fetched & {"pytorch_model.bin", "modeling_evil.py"}, fetched
    hub.stop()  # connection refused from now on: the cache must answer, online mode or not
    for offline in (False, True):
        code, err, again, seconds = _load(tmp_path, env, model=REPO, offline=offline)
        assert code == 0, err
        torch.testing.assert_close(again, logits, rtol=0, atol=0)


def test_revision_is_asked_of_the_hub_and_its_model_loads(hub, tmp_path):
    code, err, logits, _ = _load(tmp_path, _env(hub.url, tmp_path / "home"), model=REPO, revision="v1")
    assert code == 0, err
    assert "v1" in hub.revisions and "main" not in hub.revisions
    torch.testing.assert_close(logits, _logits(str(tmp_path / "src-v1")), rtol=0, atol=0)


def test_unknown_revision_is_one_line(hub, tmp_path):
    code, err, _, _ = _load(tmp_path, _env(hub.url, tmp_path / "home"), model=REPO, revision="nope")
    assert code == 3
    assert f"model {REPO!r} has no revision 'nope' on the Hub" in _one_line_error(err)


def test_repository_the_hub_does_not_have_is_one_line(hub, tmp_path):
    code, err, _, _ = _load(tmp_path, _env(hub.url, tmp_path / "home"), model="tinyorg/absent")
    assert code == 3
    assert "the Hub has no repository 'tinyorg/absent'" in _one_line_error(err)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_offline_and_not_cached_fails_fast_in_one_line_without_asking_the_hub(hub, tmp_path, how):
    env = _env(hub.url, tmp_path / "home", **({"HF_HUB_OFFLINE": "1"} if how == "env" else {}))
    code, err, _, seconds = _load(tmp_path, env, model=REPO, offline=how == "flag")
    assert code == 3
    line = _one_line_error(err)
    assert f"{REPO!r}" in line and "not in the local cache" in line and "offline mode is on" in line
    assert f"hf download {REPO}" in line
    assert not [r for r in hub.requests if "tiny-llama" in r[1]], hub.requests
    assert seconds < 60, seconds  # a process start and imports; no network wait


def test_hub_that_never_answers_is_given_up_quickly(tmp_path):
    """A Hub that accepts the connection and never answers (what a dropping firewall looks like to a client
    already past connect): the bounded first request gives up after HF_HUB_ETAG_TIMEOUT, then one line."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the backlog; nothing ever reads or answers them
    try:
        env = _env(f"http://127.0.0.1:{silent.getsockname()[1]}", tmp_path / "home", HF_HUB_ETAG_TIMEOUT="2")
        code, err, _, seconds = _load(tmp_path, env, timeout=120, model=REPO)  # unbounded, it would hang
    finally:
        silent.close()
    assert code == 3
    line = _one_line_error(err)
    assert "the Hub could not be reached" in line and f"hf download {REPO}" in line
    assert seconds < 60, seconds


def test_repository_with_pickled_weights_only_names_allow_pickle(hub, tmp_path):
    files = {p.name: p.read_bytes() for p in (tmp_path / "src-main").iterdir() if p.name != "model.safetensors"}
    hub.repos["tinyorg/pickled"] = {MAIN: {**files, "pytorch_model.bin": b"a pickle"}}
    hub.refs["tinyorg/pickled"] = {"main": MAIN}
    code, err, _, _ = _load(tmp_path, _env(hub.url, tmp_path / "home"), model="tinyorg/pickled")
    assert code == 3
    assert "'tinyorg/pickled' holds only pickled weights (pytorch_model.bin)" in _one_line_error(err)
    assert "--allow-pickle" in err and "pytorch_model.bin" not in hub.files_fetched()


def test_cli_generate_downloads_the_model(hub, tmp_path):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(json.dumps({"input": "hello"}) + "\n")
    run = subprocess.run([sys.executable, "-m", "prefixtune", "generate", "--model", REPO, "--revision", "v1",
                          "--device", "cpu", "--input", str(inputs), "--num-beams", "1", "--max-new-tokens", "3",
                          "--min-new-tokens", "0"], env=_env(hub.url, tmp_path / "home"), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    row = json.loads(run.stdout)
    assert row["input"] == "hello" and isinstance(row["output"], str)
    assert "v1" in hub.revisions
