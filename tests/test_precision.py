"""precision.bf16_wanted: auto follows what bf16 measures on this machine, decided once per machine."""

from __future__ import annotations

import json
import types

import pytest
import torch

from prefixtune import precision

CPU = torch.device("cpu")
MEASURE = precision._measure  # the real probe (the `machine` fixture stands a scripted one in for it)


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A CPU whose bf16 units and measured speed-up the test sets; a fresh cache folder; counts probes."""
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path))
    precision.cpu_bf16_speedup.cache_clear()
    state = {"units": True, "speedup": 2.0, "probes": 0}

    def measure():
        state["probes"] += 1
        return state["speedup"]

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: state["units"])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(precision, "_measure", measure)
    yield state
    precision.cpu_bf16_speedup.cache_clear()


def test_on_and_off_are_taken_as_given(machine):
    machine["units"] = False
    assert precision.bf16_wanted("on", CPU) and not precision.bf16_wanted("off", CPU)
    assert machine["probes"] == 0


def test_no_bf16_units_means_fp32_without_measuring(machine):
    # oneDNN calls bf16 "supported" on any AVX-512 CPU and then emulates it, much slower than fp32.
    machine["units"] = False
    assert precision.bf16_wanted("auto", CPU) is False
    assert machine["probes"] == 0 and precision.describe_cpu() == "no bf16 units"


@pytest.mark.parametrize("speedup, wanted", [(2.0, True), (1.2, True), (1.1, False), (0.6, False)])
def test_with_bf16_units_auto_follows_the_measured_speedup(machine, speedup, wanted):
    # e.g. 0.6: an Intel Xeon with avx512_bf16 but no AMX, where bf16 autocast was slower than fp32
    machine["speedup"] = speedup
    assert precision.bf16_wanted("auto", CPU) is wanted
    assert ("bf16 autocast used" in precision.describe_cpu()) is wanted


def test_the_answer_is_kept_per_machine_so_every_process_agrees(machine, tmp_path):
    machine["speedup"] = 0.6
    assert precision.bf16_wanted("auto", CPU) is False
    precision.cpu_bf16_speedup.cache_clear()  # as a new process would start
    machine["speedup"] = 3.0  # a noisier measurement must not flip a resumed run's precision
    assert precision.bf16_wanted("auto", CPU) is False
    assert machine["probes"] == 1
    saved = json.loads((tmp_path / "bf16-auto.json").read_text())
    assert list(saved.values()) == [0.6] and precision.cpu_name() in next(iter(saved))


def test_a_damaged_cache_file_is_measured_again_and_rewritten(machine, tmp_path):
    (tmp_path / "bf16-auto.json").write_text("{not json")
    assert precision.bf16_wanted("auto", CPU) is True
    assert machine["probes"] == 1
    assert list(json.loads((tmp_path / "bf16-auto.json").read_text()).values()) == [2.0]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.fixture
def fake_timing(monkeypatch):
    """The probe's clock advances only when its layer runs (which then computes nothing), by the next scripted
    cost for the precision the layer runs in; the first call of each precision is the untimed warm-up."""
    clock = {"now": 0.0, "costs": {}, "ran": []}

    def forward(layer, x):
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        clock["ran"].append(dtype)
        clock["now"] += clock["costs"][dtype].pop(0)
        return x

    monkeypatch.setattr(torch.nn.Linear, "forward", forward)
    monkeypatch.setattr(precision, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    return clock


def test_the_probe_is_fp32_time_over_bf16_time_best_of_the_repeats(fake_timing):
    # repeats of 2 calls: fp32 takes 10, 4, 6 (best 4), bf16 2, 6, 4 (best 2); the warm-ups (100) are not timed
    fake_timing["costs"] = {torch.float32: [100, 5, 5, 2, 2, 3, 3], torch.bfloat16: [100, 1, 1, 3, 3, 2, 2]}
    assert precision._measure(repeats=3, calls=2) == 2.0  # a mean would give 1.67, a timed warm-up 1.0
    assert fake_timing["ran"] == [torch.float32] * 7 + [torch.bfloat16] * 7
    assert all(not costs for costs in fake_timing["costs"].values())


@pytest.mark.parametrize("fp32, bf16, wanted", [(1.2, 1.0, True), (1.1, 1.0, False), (1.0, 2.0, False)])
def test_auto_decides_on_the_probe_s_measurement(machine, monkeypatch, fake_timing, fp32, bf16, wanted):
    monkeypatch.setattr(precision, "_measure", MEASURE)
    fake_timing["costs"] = {torch.float32: [0.0] + [fp32] * 100, torch.bfloat16: [0.0] + [bf16] * 100}
    assert precision.bf16_wanted("auto", CPU) is wanted
    assert precision.cpu_bf16_speedup() == round(fp32 / bf16, 3)


def test_a_cache_folder_that_cannot_be_written_warns_and_still_decides(machine, tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(blocked))
    with pytest.warns(UserWarning, match="could not keep the bf16 speed probe"):
        assert precision.bf16_wanted("auto", CPU) is True
