"""precision: `--bf16 auto` times the real workload in both precisions and keeps only clear, recent answers."""

from __future__ import annotations

import json
import types

import pytest
import torch

from prefixtune import precision

CPU = torch.device("cpu")


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A CPU with bf16 units (settable), a fresh cache folder, an empty per-process memo and a fake clock:
    `work(costs)` is a workload whose step advances the clock by the next scripted cost of the precision it
    runs in ({False: fp32 costs, True: bf16 costs}; the first cost of each is the untimed warm-up)."""
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(precision, "_DECIDED", {})
    state = {"units": True, "now": 0.0, "wall": 1e9, "ran": []}
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: state["units"])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(precision, "time", types.SimpleNamespace(perf_counter=lambda: state["now"],
                                                                 time=lambda: state["wall"]))

    def work(costs: dict[bool, list[float]], key: str = "train tiny") -> precision.Workload:
        def step() -> None:
            bf16 = torch.is_autocast_enabled("cpu")
            state["ran"].append(bf16)
            state["now"] += costs[bf16].pop(0)

        return precision.Workload(key, step)

    state["work"] = work
    return state


def steady(fp32: float, bf16: float, n: int = 17) -> dict[bool, list[float]]:
    return {False: [fp32] * n, True: [bf16] * n}


def new_process(monkeypatch) -> None:
    monkeypatch.setattr(precision, "_DECIDED", {})


def test_on_and_off_are_taken_as_given(machine):
    machine["units"] = False
    assert precision.bf16_wanted("on", CPU) and not precision.bf16_wanted("off", CPU)
    assert machine["ran"] == []


def test_no_bf16_units_means_fp32_without_measuring(machine):
    # oneDNN calls bf16 "supported" on any AVX-512 CPU and then emulates it, much slower than fp32.
    machine["units"] = False
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(2.0, 1.0))) is False
    assert machine["ran"] == [] and precision.describe_cpu() == "no bf16 units"


@pytest.mark.parametrize("fp32, bf16, wanted", [(2.0, 1.0, True), (1.2, 1.0, True), (1.05, 1.0, False),
                                                (1.0, 1.6, False)])
def test_auto_follows_the_workload_s_measured_speedup_with_a_margin(machine, fp32, bf16, wanted):
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(fp32, bf16))) is wanted


def test_precisions_alternate_after_one_untimed_warm_up_each(machine):
    # warm-ups cost 100 and must not count; round 1 fp32 first, round 2 bf16 first, ...
    costs = {False: [100, 3, 3, 3, 3], True: [100, 1, 1, 1, 1]}
    found = precision.measure(machine["work"](costs), rounds=4)
    assert found.ratios == (3.0, 3.0, 3.0, 3.0) and found.speedup == 3.0 and found.clear
    assert machine["ran"] == [False, True, False, True, True, False, False, True, True, False]


def test_the_median_decides_not_one_lucky_round(machine):
    # a busy neighbour slowed every fourth fp32 round: the mean ratio would say 1.75 (bf16), the median 1.0
    costs = {False: [1] + [4, 1, 1, 1] * 4, True: [1] * 17}
    found = precision.measure(machine["work"](costs), rounds=4)
    assert found.speedup == 1.0 and not found.bf16 and not found.clear


def test_a_clear_answer_is_kept_so_later_processes_agree_without_measuring(machine, monkeypatch, tmp_path):
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(2.0, 1.0))) is True
    new_process(monkeypatch)
    machine["ran"].clear()
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(1.0, 2.0))) is True  # not measured again
    assert machine["ran"] == []
    saved = json.loads((tmp_path / "bf16-auto.json").read_text())
    assert saved[precision.machine_key()]["train tiny"]["speedup"] == 2.0


def test_a_noisy_answer_decides_this_process_only_and_is_measured_again(machine, monkeypatch, tmp_path):
    # ratios straddle the margin: measured twice as long, then decided on the median, and not kept
    noisy = {False: [1] + [1.5, 0.9] * 8, True: [1] * 17}
    found = precision.measure(machine["work"](noisy))
    assert len(found.ratios) == 2 * precision.ROUNDS and not found.clear
    noisy = {False: [1] + [1.5, 0.9] * 8, True: [1] * 17}
    precision.bf16_wanted("auto", CPU, machine["work"](noisy))
    assert not (tmp_path / "bf16-auto.json").exists()
    new_process(monkeypatch)
    machine["ran"].clear()
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(2.0, 1.0))) is True
    assert machine["ran"]  # measured again, and this clear answer is kept
    assert json.loads((tmp_path / "bf16-auto.json").read_text())[precision.machine_key()]["train tiny"]["speedup"] == 2.0


def test_unsteady_timings_of_one_precision_are_not_kept_even_if_the_ratios_agree(machine):
    costs = {False: [1, 3, 6, 3, 6, 3, 6, 3, 6] * 2, True: [1] + [1] * 16}
    assert not precision.measure(machine["work"](costs)).clear


def test_an_old_answer_is_measured_again(machine, monkeypatch):
    precision.bf16_wanted("auto", CPU, machine["work"](steady(2.0, 1.0)))
    new_process(monkeypatch)
    machine["wall"] += precision.MAX_AGE_S + 1
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(1.0, 2.0))) is False


def test_answers_are_per_workload_and_per_machine(machine, monkeypatch):
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(2.0, 1.0), key="train a")) is True
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(1.0, 2.0), key="decode b")) is False
    new_process(monkeypatch)
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch: another machine key
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(1.0, 2.0), key="train a")) is False


def test_a_damaged_or_old_format_cache_file_is_measured_again_and_rewritten(machine, tmp_path):
    (tmp_path / "bf16-auto.json").write_text(json.dumps({precision.machine_key(): 0.41}))  # the old format
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(2.0, 1.0))) is True
    (tmp_path / "bf16-auto.json").write_text("{not json")
    precision._DECIDED.clear()
    assert precision.bf16_wanted("auto", CPU, machine["work"](steady(2.0, 1.0))) is True
    assert json.loads((tmp_path / "bf16-auto.json").read_text())[precision.machine_key()]["train tiny"]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_cache_folder_that_cannot_be_written_warns_and_still_decides(machine, tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(blocked))
    with pytest.warns(UserWarning, match="could not keep the bf16 speed probe"):
        assert precision.bf16_wanted("auto", CPU, machine["work"](steady(2.0, 1.0))) is True


def test_the_default_workload_is_a_real_matmul_of_the_default_model_shape():
    work = precision.matmul_workload(rows=4, d_in=8, d_out=16)
    work.step()  # runs, changes nothing
    assert work.key == "matmul 4x8x16"
    assert [precision.shape_bucket(n) for n in (1, 5, 8, 9, 160)] == [1, 8, 8, 16, 256]
