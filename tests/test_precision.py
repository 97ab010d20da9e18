"""precision.bf16_wanted: auto follows what bf16 measures on this machine, decided once per machine."""

from __future__ import annotations

import json

import pytest
import torch

from prefixtune import precision

CPU = torch.device("cpu")


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
    # oneDNN calls bf16 "supported" on any AVX-512 CPU and then emulates it ~4x slower than fp32.
    machine["units"] = False
    assert precision.bf16_wanted("auto", CPU) is False
    assert machine["probes"] == 0 and precision.describe_cpu() == "no bf16 units"


@pytest.mark.parametrize("speedup, wanted", [(2.0, True), (1.2, True), (1.1, False), (0.6, False)])
def test_with_bf16_units_auto_follows_the_measured_speedup(machine, speedup, wanted):
    # e.g. an Intel Xeon with avx512_bf16 but no AMX, where bf16 autocast ran at 0.6x fp32's speed
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


def test_the_probe_measures_a_positive_ratio():
    assert precision._measure(repeats=1, calls=2) > 0


def test_a_cache_folder_that_cannot_be_written_warns_and_still_decides(machine, tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(blocked))
    with pytest.warns(UserWarning, match="could not keep the bf16 speed probe"):
        assert precision.bf16_wanted("auto", CPU) is True
