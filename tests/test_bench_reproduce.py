"""bench/reproduce.py's planning and bench/repro_report.py's statistics (no model is trained here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import repro_report  # noqa: E402
import reproduce  # noqa: E402


def test_run_ids_are_unique_and_grid_comes_first():
    plan = reproduce.plan()
    ids = [spec.run_id for spec in plan]
    assert len(ids) == len(set(ids))
    grid = [i for i, spec in enumerate(plan) if spec.experiment == "grid"]
    assert grid == list(range(len(grid))) and len(grid) == sum(len(v) for v in reproduce.GRIDS.values())


def _write(results: Path, spec, bleu: float) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{spec.run_id}.json").write_text(json.dumps({"scores": {"bleu": bleu}}))


def test_learning_rate_is_the_grid_winner_once_the_grid_is_complete(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path)
    prefix_grid = [s for s in reproduce.grid_runs() if s.method == "prefix"]
    for i, spec in enumerate(prefix_grid[:-1]):  # the second rate wins
        _write(tmp_path, spec, 60.0 if i == 1 else 50.0 - i)
    assert reproduce.chosen_lr("prefix") is None  # one rate still missing
    assert all(s.method != "prefix" or s.experiment == "grid" for s in reproduce.pending(None))
    _write(tmp_path, prefix_grid[-1], 55.0)
    assert reproduce.chosen_lr("prefix") == prefix_grid[1].lr
    assert reproduce.chosen_lr("peft-prefix") == prefix_grid[1].lr  # same method, same rate
    todo = reproduce.pending("lowdata-e2e-prefix-50-s0")
    assert [s.lr for s in todo] == [prefix_grid[1].lr]
    assert not any(s.run_id == prefix_grid[0].run_id for s in reproduce.pending(None))  # done runs are skipped


@pytest.mark.parametrize("t, df, p", [(2.776, 4, 0.05), (4.604, 4, 0.01), (2.228, 10, 0.05), (1.0, 30, 0.3253)])
def test_paired_t_p_values_match_student_t_tables(t, df, p):
    assert abs(2 * (1 - repro_report._t_cdf(t, df)) - p) < 5e-4


def test_compare_says_ahead_behind_or_not_separable():
    base = {s: 50.0 + s for s in range(5)}
    ahead = {s: v + 2.0 + 0.1 * (s % 2) for s, v in base.items()}
    noisy = {s: v + (-1.0 if s % 2 else 3.0) for s, v in base.items()}  # p ~ 0.23
    assert repro_report.compare(ahead, base)[0] == "ahead"
    assert repro_report.compare(base, ahead)[0] == "behind"
    assert repro_report.compare(noisy, base)[0] == "not separable at these seeds"
    assert repro_report.compare({0: 1.0}, base)[0].startswith("undecided")
