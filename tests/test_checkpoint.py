"""A saved prefix is one unit: a save killed or failing at any point leaves the old pair or the new one, never
a mix, and the next save removes what it left behind. Non-finite prefixes and resume states are never written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from prefixtune import artifact, checkpoint, inject, resume
from prefixtune.config import PrefixConfig
from prefixtune.model import PrefixTuningModel

ROOT = Path(__file__).resolve().parents[1]
PAIR = sorted([checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME, "README.md"])  # README.md: the model card


def _ptm(value: float) -> PrefixTuningModel:
    ptm = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=2, reparam="table"))
    with torch.no_grad():
        for p in ptm.parameters():
            if p.requires_grad:
                p.fill_(value)
    return ptm


def _load(directory: Path) -> tuple[set[float], str]:
    """(the values found in the loaded prefix, the tag its config carries)."""
    base = tiny_model("llama")
    loaded = checkpoint.load(directory, inject.prepare(base)[1], "llama")
    values = {float(x) for k, v in loaded.prefix.kv.values() for x in torch.cat([k.flatten(), v.flatten()]).unique()}
    return values, loaded.meta["tag"]


# Run in a fresh process: save the "new" prefix (all 2.0) over the "old" one (all 1.0) and SIGKILL itself at
# the given call of the given function (before that call does anything).
_KILLER = """
import os, pathlib, signal, sys
sys.path.insert(0, {tests!r})
import torch
from prefixtune import checkpoint
from test_checkpoint import _ptm

where, at = {where!r}, {at}
module, name = {{"replace": (checkpoint.os, "replace"), "save_file": (checkpoint, "save_file"),
                 "rmdir": (pathlib.Path, "rmdir")}}[where]
real, calls = getattr(module, name), []

def hooked(*args, **kwargs):
    calls.append(1)
    if len(calls) == at:
        if where == "save_file":  # half a file first, as a kill during the write leaves it
            real(*args, **kwargs)
            path = pathlib.Path(args[1])
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

setattr(module, name, hooked)
_ptm(2.0).save_pretrained({out!r}, extra={{"tag": "new"}})
"""


@pytest.mark.parametrize("where, at, expected", [
    ("save_file", 1, "old"),     # weights half-written in the staging directory
    ("replace", 1, "old"),       # before the config (the commit) is moved into place
    ("replace", 2, "new"),       # the new config in place, the old weights in place, the new ones staged
    ("rmdir", 1, "new"),         # both moved, the empty staging directory left
])
def test_a_save_killed_anywhere_leaves_the_old_pair_or_the_new_one(tmp_path, where, at, expected):
    out = tmp_path / "p"
    _ptm(1.0).save_pretrained(out, extra={"tag": "old"})
    script = _KILLER.format(tests=str(ROOT / "tests"), where=where, at=at, out=str(out))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert _load(out) == ({1.0}, "old") if expected == "old" else _load(out) == ({2.0}, "new")
    _ptm(3.0).save_pretrained(out, extra={"tag": "newer"})  # the next save cleans up after the killed one
    assert sorted(x.name for x in out.iterdir()) == PAIR
    assert _load(out) == ({3.0}, "newer")


@pytest.mark.parametrize("failing_call, expected", [(1, "old"), (2, "new")])
def test_a_save_failing_between_the_renames_is_old_or_new(tmp_path, monkeypatch, failing_call, expected):
    out = tmp_path / "p"
    _ptm(1.0).save_pretrained(out, extra={"tag": "old"})
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == failing_call:
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        _ptm(2.0).save_pretrained(out, extra={"tag": "new"})
    monkeypatch.undo()
    assert _load(out) == ({1.0}, "old") if expected == "old" else _load(out) == ({2.0}, "new")
    staged = [x.name for x in out.iterdir() if x.name.startswith(artifact.STAGE_PREFIX)]
    assert len(staged) == (expected == "new")  # kept only while it holds the committed weights


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "p"
    out.mkdir()
    dead, alive = _dead_pid(), os.getppid()
    stale = [f".{checkpoint.WEIGHTS_NAME}.tmp{dead}", f".{checkpoint.CONFIG_NAME}.tmp{dead}",
             f"{artifact.STAGE_PREFIX}{dead}-abcd1234"]
    live = [f".{checkpoint.WEIGHTS_NAME}.tmp{alive}", f"{artifact.STAGE_PREFIX}{alive}-abcd1234"]
    for name in stale + live:
        (out / name).mkdir() if name.startswith(artifact.STAGE_PREFIX) else (out / name).write_bytes(b"x" * 100)
    (out / f".{resume.STATE_NAME}.tmp{dead}").write_bytes(b"x")  # another writer's kind: left to it
    _ptm(1.0).save_pretrained(out, extra={"tag": "old"})
    assert sorted(x.name for x in out.iterdir()) == sorted(PAIR + live + [f".{resume.STATE_NAME}.tmp{dead}"])


def test_a_resume_state_save_removes_its_own_stale_temporaries_only(tmp_path):
    ptm, dead = _ptm(1.0), _dead_pid()
    optimizer = torch.optim.AdamW([p for p in ptm.parameters() if p.requires_grad])
    (tmp_path / f".{resume.STATE_NAME}.tmp{dead}").write_bytes(b"x")
    (tmp_path / f"{artifact.STAGE_PREFIX}{dead}-abcd1234").mkdir()  # may hold a committed prefix's weights
    resume.save_state(tmp_path, ptm, optimizer, {"step": 1, "best_dev": None, "bad_evals": 0, "elapsed": 0.0})
    assert sorted(x.name for x in tmp_path.iterdir()) == [f"{artifact.STAGE_PREFIX}{dead}-abcd1234", resume.STATE_NAME]


def test_non_finite_prefix_or_state_is_never_written(tmp_path):
    out = tmp_path / "p"
    _ptm(1.0).save_pretrained(out, extra={"tag": "old"})
    before = {x.name: x.read_bytes() for x in out.iterdir()}
    with pytest.raises(artifact.NonFiniteError, match=f"refusing to save the prefix into {out}: tensors .* hold non-finite values"):
        _ptm(float("nan")).save_pretrained(out, extra={"tag": "nan"})
    assert {x.name: x.read_bytes() for x in out.iterdir()} == before
    ptm = _ptm(float("inf"))
    optimizer = torch.optim.AdamW([p for p in ptm.parameters() if p.requires_grad])
    with pytest.raises(artifact.NonFiniteError, match="refusing to write .*resume_state.safetensors"):
        resume.save_state(tmp_path, ptm, optimizer, {"step": 1, "best_dev": None, "bad_evals": 0, "elapsed": 0.0})
    assert not (tmp_path / resume.STATE_NAME).exists()


def _mlp_state(tmp_path: Path) -> tuple[PrefixTuningModel, dict]:
    """A resume state of an MLP-reparametrised prefix (several parameters) after one AdamW step."""
    torch.manual_seed(0)
    ptm = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=2, mlp_hidden=8))
    optimizer = torch.optim.AdamW([p for p in ptm.parameters() if p.requires_grad])
    ptm.prefix_kv().kv[("self", 0)][0].sum().backward()
    optimizer.step()
    counters = {"step": 3, "best_dev": 1.25, "bad_evals": 0, "elapsed": 2.0, "options": {"lr": 0.01}}
    resume.save_state(tmp_path, ptm, optimizer, counters)
    return ptm, counters


def _fresh(seed: int = 1):
    torch.manual_seed(seed)
    ptm = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=2, mlp_hidden=8))
    return ptm, torch.optim.AdamW([p for p in ptm.parameters() if p.requires_grad])


def test_a_checked_state_restores_parameters_and_moments_exactly(tmp_path):
    ptm, counters = _mlp_state(tmp_path)
    fresh, optimizer = _fresh()
    assert resume.apply_state(resume.read_state(tmp_path, {"lr": 0.01}), fresh, optimizer) == counters
    for (name, p), q in zip(ptm.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name
    assert sum(len(s) for s in optimizer.state.values()) == 3 * sum(p.requires_grad for p in fresh.parameters())


def test_a_state_that_does_not_fit_is_refused_before_anything_changes(tmp_path):
    from safetensors.torch import load_file, save_file

    _mlp_state(tmp_path)
    state = resume.read_state(tmp_path, {"lr": 0.01})
    last = sorted(k for k in state.tensors if k.endswith("/exp_avg"))[-1]
    state.tensors[last] = torch.zeros(3)  # one moment of the last parameter has another shape
    fresh, optimizer = _fresh()
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(ValueError, match=f"does not match this run's prefix .*optimizer state exp_avg"):
        resume.apply_state(state, fresh, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters())) and not optimizer.state


def test_configs_saved_before_checksums_still_load(tmp_path):
    out = tmp_path / "p"
    _ptm(1.0).save_pretrained(out, extra={"tag": "old"})
    meta = json.loads((out / checkpoint.CONFIG_NAME).read_text())
    del meta["weights_sha256"]
    (out / checkpoint.CONFIG_NAME).write_text(json.dumps(meta))
    assert _load(out) == ({1.0}, "old")
