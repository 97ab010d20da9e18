"""`train --report-to`: the tracker gets the same train loss, lr and dev loss as metrics.csv (read back from
TensorBoard's event files), plus the final summary; a tracker that is not installed is one line, exit 2,
before anything is loaded."""

from __future__ import annotations

import csv
import json

import pytest

from prefixtune import extras
from prefixtune.cli import main
from prefixtune.config import TrainConfig
from prefixtune.runlog import PROJECT, TRACKER_DIR


def _train_args(model_dir, out, *extra):
    return ["train", "--task", "e2e", "--model", model_dir, "--output", str(out), "--train-size", "24",
            "--batch-size", "8", "--prefix-length", "4", "--mlp-hidden", "32", "--lr", "0.01", "--bf16", "off",
            "--no-progress", *extra]


def _scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_the_csv_values_and_the_summary(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(_train_args(tiny_dir, out, "--epochs", "3", "--eval-every", "4", "--report-to", "tensorboard")) == 0
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    logged = _scalars(out / TRACKER_DIR / PROJECT)
    assert len(rows) == 9
    assert sorted(logged["train_loss"]) == sorted(logged["lr"]) == [int(r["step"]) for r in rows]
    for r in rows:
        step = int(r["step"])
        # the CSV rounds (loss to 5 decimals, lr to 4 digits); the tracker holds the float32 of the same value
        assert logged["train_loss"][step] == pytest.approx(float(r["train_loss"]), abs=1e-5)
        assert logged["lr"][step] == pytest.approx(float(r["lr"]), rel=1e-3)
    dev = {int(r["step"]): float(r["dev_loss"]) for r in rows if r["dev_loss"]}
    assert sorted(dev) == [4, 8, 9] and sorted(logged["dev_loss"]) == sorted(dev)
    assert all(logged["dev_loss"][s] == pytest.approx(v, abs=1e-5) for s, v in dev.items())
    summary = json.loads((out / "train_summary.json").read_text())
    assert logged["summary/steps"] == {9: 9.0}
    assert logged["summary/best_dev_loss"][9] == pytest.approx(summary["best_dev_loss"], rel=1e-6)
    assert logged["summary/prefix_parameters"][9] == summary["prefix_parameters"]


def test_a_resumed_run_continues_the_same_curves(tiny_dir, tmp_path):
    """Resumed from its step-4 state, the run logs steps 5-9: every step once, with the CSV's values (the
    resume drops tracker events from step 5 on, which only a killed run would have written)."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert main(_train_args(tiny_dir, out, "--max-steps", "4", "--report-to", "tensorboard")) == 0
    assert main(_train_args(tiny_dir, out, "--max-steps", "9", "--report-to", "tensorboard", "--resume")) == 0
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    logged = _scalars(out / TRACKER_DIR / PROJECT)
    assert sorted(logged["train_loss"]) == [int(r["step"]) for r in rows] == list(range(1, 10))
    assert all(logged["train_loss"][int(r["step"])] == pytest.approx(float(r["train_loss"]), abs=1e-5) for r in rows)


def test_no_tracker_by_default(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_train_args(tiny_dir, out, "--max-steps", "2")) == 0
    assert TrainConfig().report_to == "none" and not (out / TRACKER_DIR).exists()


@pytest.mark.parametrize("tracker, module, hint", [("tensorboard", "tensorboard", "pip install 'prefixtune[track]'"),
                                                   ("wandb", "wandb", "pip install wandb"),
                                                   ("mlflow", "mlflow", "pip install mlflow")])
def test_a_tracker_that_is_not_installed_is_one_line_before_loading(tracker, module, hint, tmp_path, monkeypatch,
                                                                   capsys):
    real = extras.importlib.util.find_spec
    monkeypatch.setattr(extras.importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))

    def no_model(*_args, **_kwargs):
        raise AssertionError("the missing tracker should be reported before the model is loaded")

    monkeypatch.setattr("prefixtune.base_model.load", no_model)
    monkeypatch.setattr("prefixtune.train.load_training_data", no_model)
    assert main(_train_args("unused", tmp_path / "run", "--report-to", tracker)) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and f"--report-to {tracker}" in line and f"package {module!r}" in line, line
    assert line.endswith(hint), line
    assert not (tmp_path / "run").exists()


def test_unknown_tracker_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_train_args("unused", tmp_path / "run", "--report-to", "comet"))
    assert "invalid choice: 'comet'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="report_to must be one of none, tensorboard, wandb, mlflow, got 'comet'"):
        TrainConfig(report_to="comet").validate()
