"""Bad inputs on the command line and bad files on disk (issue 15): each gets one line naming the file or
value and exit 2, and nothing is written or changed. Diverging training stops without saving NaN.

Every case runs the CLI in-process (`prefixtune.cli.main`) on tiny models; the table says what it breaks,
the command, and the words the error line must hold.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import save_tiny, tiny_model
from prefixtune import checkpoint, resume
from prefixtune.cli import main
from prefixtune.config import PrefixConfig
from prefixtune.model import PrefixTuningModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = ["--task", "e2e", "--train-size", "24", "--batch-size", "8", "--prefix-length", "2", "--mlp-hidden", "8",
         "--lr", "0.01", "--bf16", "off", "--no-progress"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, one_torch_thread):
    """A tiny model directory, a prefix saved for it, and a short run with its resume state (built once)."""
    root = tmp_path_factory.mktemp("assets")
    model = save_tiny(root / "model")
    ptm = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=2, reparam="table"))
    ptm.save_pretrained(root / "prefix")
    assert main(["train", *TRAIN, "--model", model, "--output", str(root / "run"), "--max-steps", "2",
                 "--resume-every", "1"]) == 0
    (root / "in.jsonl").write_text('{"task": "t", "input": "name[The Eagle]"}\n')
    return root


def _snapshot(root: Path) -> dict[str, str]:
    """Every path below `root` with the SHA-256 of its bytes ('dir' for directories)."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _rewrite_prefix(d: Path, change: Callable[[dict], None], keep_checksum: bool = True) -> None:
    """Rewrite the prefix's tensors, with (keep_checksum) a config checksum that matches the new file, so
    the check under test is the one that refuses it."""
    tensors = load_file(d / checkpoint.WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, str(d / checkpoint.WEIGHTS_NAME))
    digest = hashlib.sha256((d / checkpoint.WEIGHTS_NAME).read_bytes()).hexdigest()
    _edit_json(d / checkpoint.CONFIG_NAME, lambda m: m.update(weights_sha256=digest) if keep_checksum
               else m.pop("weights_sha256"))


def _rewrite_state(d: Path, tensors_change=None, counters_change=None) -> None:
    """Rewrite the resume state, recomputing its checksum (so the check under test is the one that refuses)."""
    from safetensors import safe_open

    path = d / resume.STATE_NAME
    with safe_open(str(path), framework="pt") as f:
        counters = json.loads(f.metadata()["counters"])
    tensors = load_file(path)
    if tensors_change:
        tensors_change(tensors)
    if counters_change:
        counters_change(counters)
    from prefixtune.artifact import tensors_digest

    save_file(tensors, str(path), metadata={"counters": json.dumps(counters), "tensors_digest": tensors_digest(tensors)})


def _flip_last_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(b ^ 0x55 for b in data[-8:])  # tensor data, not the header: still a readable file
    path.write_bytes(bytes(data))


def _pickle_only(d: Path) -> None:
    weights = d / "model.safetensors"
    torch.save(load_file(weights), d / "pytorch_model.bin")
    weights.unlink()


def _swap_weights(d: Path) -> None:
    """Weights from another save put in place without their config (what copying one file does)."""
    tensors = {k: t + 1 for k, t in load_file(d / checkpoint.WEIGHTS_NAME).items()}
    save_file(tensors, str(d / checkpoint.WEIGHTS_NAME))


def _nan_first(tensors: dict) -> None:
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")


@dataclass
class Case:
    name: str
    argv: Callable[[Path], list[str]]  # the command, given the case's work directory
    words: tuple[str, ...]  # the error line must hold each
    setup: Callable[[Path], None] = lambda w: None  # breaks a copy of the assets in the work directory


def _train(*extra: str, model: str = "model", output: str = "out") -> Callable[[Path], list[str]]:
    return lambda w: ["train", *TRAIN, "--model", str(w / model), "--output", str(w / output), *extra]


def _generate(prefix: str = "prefix") -> Callable[[Path], list[str]]:
    return lambda w: ["generate", "--model", str(w / "model"), "--prefix", f"t={w / prefix}", "--input",
                      str(w / "in.jsonl"), "--output", str(w / "out.jsonl"), "--max-new-tokens", "3",
                      "--min-new-tokens", "0"]


def _jsonl(train_file: str) -> Callable[[Path], list[str]]:
    return lambda w: ["train", "--task", "jsonl", "--train-file", str(w / train_file), "--model", str(w / "model"),
                      "--output", str(w / "out"), "--batch-size", "1", "--bf16", "off", "--no-progress"]


CASES = [
    Case("lr inf", _train("--lr", "inf"), ("lr must be > 0 and finite", "inf")),
    Case("lr nan", _train("--lr", "nan"), ("lr must be > 0 and finite", "nan")),
    Case("negative lr without =", _train("--lr", "-1e-3"), ("lr must be > 0", "-0.001")),
    Case("max_grad_norm inf", _train("--max-grad-norm", "inf"), ("max_grad_norm", "inf")),
    Case("empty train file", _jsonl("empty.jsonl"), ("empty.jsonl", "no training pairs"),
         lambda w: (w / "empty.jsonl").write_text("\n\n")),
    Case("non-UTF-8 train file", _jsonl("latin1.jsonl"), ("latin1.jsonl", "line 2", "not UTF-8"),
         lambda w: (w / "latin1.jsonl").write_bytes(b'{"input": "a", "output": "b"}\n{"input": "caf\xe9", "output": "c"}\n')),
    Case("--output is a file", _train(output="a_file"), ("a_file", "is an existing file"),
         lambda w: (w / "a_file").write_text("keep me\n")),
    Case("--output below a file", _train(output="a_file/run"), ("a_file", "cannot be created", "is a file"),
         lambda w: (w / "a_file").write_text("keep me\n")),
    Case("--output not writable", _train(output="/proc/prefixtune-test/run"),  # an absolute path stays as it is
         ("/proc/prefixtune-test/run", "not writable")),
    Case("model dir without weights", _train(), ("model", "has a config.json but no weights"),
         lambda w: (w / "model" / "model.safetensors").unlink()),
    Case("truncated model weights", _train(), ("model.safetensors", "truncated"),
         lambda w: _truncate(w / "model" / "model.safetensors")),
    Case("model dir with only a pickle", _train(), ("pytorch_model.bin", "pickled", "--allow-pickle"),
         lambda w: _pickle_only(w / "model")),
    Case("resume with another lr", _train("--resume", "--lr", "0.02", output="run"),
         ("resume_state.safetensors", "--lr was 0.01, now 0.02")),
    Case("resume with another seed", _train("--resume", "--seed", "1", output="run"),
         ("resume_state.safetensors", "--seed was 0, now 1")),
    Case("truncated resume state", _train("--resume", output="run"), ("resume_state.safetensors", "truncated"),
         lambda w: _truncate(w / "run" / resume.STATE_NAME)),
    Case("corrupted resume state bytes", _train("--resume", output="run"),
         ("resume_state.safetensors", "checksum", "corrupted"), lambda w: _flip_last_bytes(w / "run" / resume.STATE_NAME)),
    Case("NaN in the resume state", _train("--resume", output="run"), ("resume_state.safetensors", "non-finite"),
         lambda w: _rewrite_state(w / "run", tensors_change=_nan_first)),
    Case("bad resume counters", _train("--resume", output="run"), ("resume_state.safetensors", "invalid counter 'step'"),
         lambda w: _rewrite_state(w / "run", counters_change=lambda c: c.update(step=-1))),
    Case("NaN prefix", _generate(), ("prefix.safetensors", "non-finite", "lower --lr"),
         lambda w: _rewrite_prefix(w / "prefix", _nan_first)),
    Case("inf prefix, config without checksum", _generate(), ("prefix.safetensors", "non-finite"),
         lambda w: _rewrite_prefix(w / "prefix", lambda t: t.update({k: t[k] * float("inf") for k in t}), False)),
    Case("truncated prefix", _generate(), ("prefix.safetensors", "checksum", "truncated"),
         lambda w: _truncate(w / "prefix" / checkpoint.WEIGHTS_NAME)),
    Case("truncated prefix, config without checksum", _generate(), ("prefix.safetensors", "truncated"),
         lambda w: (_truncate(w / "prefix" / checkpoint.WEIGHTS_NAME),
                    _edit_json(w / "prefix" / checkpoint.CONFIG_NAME, lambda m: m.pop("weights_sha256")))),
    Case("weights of another save", _generate(), ("prefix.safetensors", "checksum", "replaced without its config"),
         lambda w: _swap_weights(w / "prefix")),
    Case("prefix config missing a key", _generate(), ("prefix_config.json", "lacks the key 'base_model'"),
         lambda w: _edit_json(w / "prefix" / checkpoint.CONFIG_NAME, lambda m: m.pop("base_model"))),
    Case("prefix config missing a nested key", _generate(), ("prefix_config.json", "'base_model.layer_shapes'"),
         lambda w: _edit_json(w / "prefix" / checkpoint.CONFIG_NAME, lambda m: m["base_model"].pop("layer_shapes"))),
    Case("text_format.source without {input}", _generate(), ("prefix_config.json", "must contain '{input}'"),
         lambda w: _edit_json(w / "prefix" / checkpoint.CONFIG_NAME,
                              lambda m: m["text_format"].update(source=" same text for every input {eos}"))),
    Case("prefix config not JSON", _generate(), ("prefix_config.json", "not valid JSON"),
         lambda w: (w / "prefix" / checkpoint.CONFIG_NAME).write_text("{oops")),
]
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, assets, tmp_path, capsys):
    work = tmp_path / "work"
    shutil.copytree(assets, work)
    case.setup(work)
    before = _snapshot(work)
    capsys.readouterr()
    try:
        code = main(case.argv(work))
    except SystemExit as exit_:  # argparse refusals
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in case.words:
        assert word in lines[0], (word, lines[0])
    assert _snapshot(work) == before  # nothing written, created or changed


def test_pickled_base_weights_load_with_allow_pickle(assets, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(assets, work)
    _pickle_only(work / "model")
    assert main(_generate()(work) + ["--allow-pickle"]) == 0
    assert json.loads((work / "out.jsonl").read_text())["task"] == "t"


def test_negative_values_are_joined_to_their_flag():
    from prefixtune.cli import _join_negative_numbers

    assert _join_negative_numbers(["train", "--lr", "-1e-3", "--output", "-", "--seed", "-inf"]) == [
        "train", "--lr=-1e-3", "--output", "-", "--seed=-inf"]


@pytest.mark.parametrize("error", [ValueError("first line\n  second line"),
                                   PermissionError(13, "Permission denied", "/somewhere/file")])
def test_any_refusal_is_one_error_line_and_exit_2(monkeypatch, capsys, error):
    from prefixtune import train as train_module

    def fail(cfg):
        raise error

    monkeypatch.setattr(train_module, "train", fail)
    assert main(["train"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: " + " ".join(str(error).split())]


# --- training that diverges ------------------------------------------------------------------------

def _nan_at(monkeypatch, bad: Callable[[int], bool]) -> None:
    """Make the gradients and loss of the optimizer steps where `bad(step)` NaN (a bad batch, an overflow)."""
    from prefixtune import train as train_module

    real, calls = train_module._step, []

    def step(model, *args):
        loss = real(model, *args)
        calls.append(loss)
        if bad(len(calls)):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
            return float("nan")
        return loss

    monkeypatch.setattr(train_module, "_step", step)


def _record_saves(monkeypatch) -> list:
    """(step of a resume state, file name, bytes, tensors) of every prefix and resume state written."""
    saved = []
    real_prefix, real_state = checkpoint.save, resume.save_state

    def prefix(directory, *args, **kw):
        out = real_prefix(directory, *args, **kw)
        path = Path(directory) / checkpoint.WEIGHTS_NAME
        saved.append((None, path.name, path.read_bytes(), load_file(path)))
        return out

    def state(run_dir, model, optimizer, counters, *rest):
        real_state(run_dir, model, optimizer, counters, *rest)
        path = Path(run_dir) / resume.STATE_NAME
        saved.append((counters["step"], path.name, path.read_bytes(), load_file(path)))

    monkeypatch.setattr(checkpoint, "save", prefix)
    monkeypatch.setattr(resume, "save_state", state)
    return saved


def test_nan_steps_beyond_the_limit_stop_training_and_keep_the_best_prefix(assets, tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, lambda step: step >= 3)
    saved = _record_saves(monkeypatch)
    out = tmp_path / "run"
    argv = _train("--max-steps", "9", "--eval-every", "2", "--resume-every", "2", "--max-nonfinite-steps", "2",
                  output=str(out))
    assert main(argv(assets)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: training stopped at step 5: loss or gradient was NaN/inf for 3 steps in a row")
    assert "--max-nonfinite-steps 2" in line and f"the best prefix so far (dev loss" in line and str(out) in line
    prefixes = [s for s in saved if s[1] == checkpoint.WEIGHTS_NAME]
    states = [s for s in saved if s[1] == resume.STATE_NAME]
    assert len(prefixes) == 1 and (out / checkpoint.WEIGHTS_NAME).read_bytes() == prefixes[0][2]  # from step 2
    # due at step 4 too, but not written inside a run of skipped steps
    assert [s[0] for s in states] == [2] and (out / resume.STATE_NAME).read_bytes() == states[0][2]
    assert all(bool(torch.isfinite(t).all()) for s in saved for t in s[3].values())
    assert not (out / "train_summary.json").exists()


def test_a_few_nan_steps_are_skipped_and_training_finishes(assets, tmp_path, monkeypatch, capsys):
    _nan_at(monkeypatch, lambda step: step in (2, 3, 5, 6))  # 4 in all, at most 2 in a row
    out = tmp_path / "run"
    assert main(_train("--max-steps", "7", "--max-nonfinite-steps", "2", output=str(out))(assets)) == 0
    err = capsys.readouterr().err
    assert "step 2: loss nan" in err and "step 6: loss nan" in err and "(2 of at most 2 in a row)" in err
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 7 and summary["best_dev_loss"] is not None
    assert all(bool(torch.isfinite(t).all()) for t in load_file(out / checkpoint.WEIGHTS_NAME).values())


def test_an_overflowing_lr_stops_training_without_saving_a_prefix(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train("--max-steps", "4", "--lr", "1e30", output=str(out))(assets)) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: training") and "no prefix was saved" in line and "lower --lr" in line.lower()
    assert not (out / checkpoint.WEIGHTS_NAME).exists() and not (out / checkpoint.CONFIG_NAME).exists()
