"""`prefixtune push` and `PrefixTuningModel.push_to_hub` against a fake Hub on 127.0.0.1 (tests/fake_hub.py):
exactly the prefix's files arrive, byte for byte; what is not a complete saved prefix is refused before the
Hub is asked; an unreachable Hub is one line, quickly."""

from __future__ import annotations

import json
import socket
import time

import pytest
import torch

from conftest import tiny_model
from fake_hub import FakeHub
from prefixtune import PrefixConfig, PrefixTuningModel, hub_push
from prefixtune.cli import main

REPO = "someone/e2e-prefix"
PREFIX_FILES = {"prefix.safetensors", "prefix_config.json", "README.md"}


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    with FakeHub() as fake:
        monkeypatch.setattr(constants, "ENDPOINT", fake.url)  # HfApi() reads it when built
        yield fake


@pytest.fixture
def run_dir(tmp_path):
    """A saved prefix with what a training run leaves beside it (none of which may be uploaded)."""
    model = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=3, reparam="table"))
    out = tmp_path / "run"
    model.save_pretrained(out, card={"task": "e2e", "steps": 5, "dev_loss": 1.25})
    for name, data in {"metrics.csv": b"step\n1\n", "train_summary.json": b"{}", "resume_state.safetensors": b"x",
                       "loss_curve.png": b"png"}.items():
        (out / name).write_bytes(data)
    (out / "trackers").mkdir()
    (out / "trackers" / "events.out").write_bytes(b"events")
    return out


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _local(directory) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in PREFIX_FILES}


def test_cli_push_uploads_exactly_the_prefix_files(hub, run_dir, monkeypatch, capsys):
    monkeypatch.setenv("MY_HUB_TOKEN", "hf_test_token")
    assert main(["push", str(run_dir), REPO, "--private", "--token-env", "MY_HUB_TOKEN"]) == 0
    (commit,) = hub.commits
    assert commit["repo"] == REPO and commit["revision"] == "main"
    assert commit["files"] == _local(run_dir)  # these three files, identical bytes, nothing else
    assert hub.private[REPO] is True
    assert hub.cards == [(run_dir / "README.md").read_text()]  # the card's front matter was validated
    assert capsys.readouterr().out.strip().startswith(f"{hub.url}/{REPO}/commit/")
    # the repository exists now: pushing again commits again (create_repo's exist_ok), on the same repo
    assert main(["push", str(run_dir), REPO, "--token-env", "MY_HUB_TOKEN"]) == 0
    assert len(hub.commits) == 2 and hub.commits[1]["files"] == _local(run_dir)


def test_push_to_a_revision_creates_the_branch_and_leaves_main(hub, run_dir):
    url = hub_push.push_folder(run_dir, REPO, token="hf_test", revision="v2", commit_message="second try")
    (commit,) = hub.commits
    assert (commit["revision"], commit["summary"]) == ("v2", "second try")
    assert hub.repos[REPO][hub.refs[REPO]["main"]] == {}  # main still the empty initial commit
    assert hub.repos[REPO][hub.refs[REPO]["v2"]] == _local(run_dir)
    assert url.endswith(hub.refs[REPO]["v2"])


def test_model_push_to_hub_uploads_a_saved_prefix_that_loads_back(hub, tmp_path):
    model = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=2, reparam="table"))
    model.push_to_hub(REPO, token="hf_test")
    (commit,) = hub.commits
    assert set(commit["files"]) == PREFIX_FILES
    # two saves of one prefix need not be the same bytes (safetensors' header order varies): compare by loading
    for name, data in commit["files"].items():
        (tmp_path / "pushed").mkdir(exist_ok=True)
        (tmp_path / "pushed" / name).write_bytes(data)
    again = PrefixTuningModel.from_pretrained(tiny_model("llama"), tmp_path / "pushed")
    for slot, (k, v) in model.prefix_kv().kv.items():
        assert torch.equal(again.prefix_kv().kv[slot][0], k) and torch.equal(again.prefix_kv().kv[slot][1], v)
    assert hub_push.check_folder(tmp_path / "pushed") == list(hub_push.FILES)  # its card describes its weights


def test_a_directory_that_is_not_a_saved_prefix_is_refused_before_the_hub_is_asked(hub, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["push", str(tmp_path / "empty"), REPO]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"cannot push {tmp_path / 'empty'}" in line and "is not a saved prefix" in line
    assert hub.requests == []


def test_corrupted_weights_or_a_card_of_another_save_are_refused(hub, run_dir, capsys):
    card = run_dir / "README.md"
    text = card.read_text()
    sha = json.loads((run_dir / "prefix_config.json").read_text())["weights_sha256"]
    card.write_text(text.replace(sha, "0" * 64))  # the card of another save: another checksum
    assert main(["push", str(run_dir), REPO]) == 2
    assert "README.md describes another save of this prefix" in _one_line(capsys.readouterr().err)
    card.write_text(text)
    weights = run_dir / "prefix.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert main(["push", str(run_dir), REPO]) == 2
    assert "does not match the checksum" in _one_line(capsys.readouterr().err)
    assert hub.requests == []


def test_token_env_that_is_not_set_and_no_token_at_all_are_one_line(hub, run_dir, monkeypatch, capsys):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    assert main(["push", str(run_dir), REPO, "--token-env", "NO_SUCH_TOKEN_VAR"]) == 2
    assert "--token-env NO_SUCH_TOKEN_VAR: the environment variable NO_SUCH_TOKEN_VAR is not set" in _one_line(
        capsys.readouterr().err)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["push", str(run_dir), REPO]) == 2
    assert "no Hugging Face token: set HF_TOKEN" in _one_line(capsys.readouterr().err)
    assert hub.requests == []


def test_unreachable_hub_is_one_line_quickly(run_dir, monkeypatch, capsys):
    from huggingface_hub import constants

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    start = time.monotonic()
    assert main(["push", str(run_dir), REPO]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"the Hub could not be reached at http://127.0.0.1:{port}" in line and "HF_ENDPOINT" in line
    assert time.monotonic() - start < 30
