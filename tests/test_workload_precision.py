"""The workloads `--bf16 auto` times (a real training step, a real decoding step) and a resumed run's choice."""

from __future__ import annotations

import json
import types

import pytest
import torch

from conftest import tiny_model
from safetensors.torch import load_file

from prefixtune import PrefixTuningModel, precision, train
from prefixtune.cli import main
from prefixtune.config import PrefixConfig, TrainConfig
from prefixtune.data import Encoded
from prefixtune.decoding import api


def _acc():
    return types.SimpleNamespace(device=torch.device("cpu"), num_processes=1, is_main_process=True)


@pytest.fixture
def measured(monkeypatch):
    """bf16_wanted stands in for a measurement that says bf16; records the workloads it was given."""
    seen = []

    def wanted(mode, device, workload=None):
        seen.append(workload)
        return mode == "on" or mode == "auto"

    monkeypatch.setattr(precision, "bf16_wanted", wanted)
    return seen


def test_a_new_run_measures_its_own_step_and_records_the_choice(measured):
    counters = {}
    _, bf16 = train._autocast(TrainConfig(bf16="auto"), _acc(), counters, "the workload")
    assert bf16 is True and counters["bf16"] is True and measured == ["the workload"]


def test_a_resumed_auto_run_keeps_its_recorded_precision_without_measuring(measured):
    counters = {"bf16": False}  # the first part of the run ran in fp32
    _, bf16 = train._autocast(TrainConfig(bf16="auto"), _acc(), counters, "the workload")
    assert bf16 is False and measured == []


def test_an_explicit_setting_wins_over_the_recorded_one(measured):
    counters = {"bf16": False}
    assert train._autocast(TrainConfig(bf16="on"), _acc(), counters, None)[1] is True
    assert counters["bf16"] is True


def test_the_train_workload_runs_a_real_step_and_leaves_no_gradient():
    ptm = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=3))
    rows = [Encoded(list(range(5 + i)) + [7, 8], [-100] * (5 + i) + [7, 8]) for i in range(4)]
    cfg = TrainConfig(batch_size=2, prefix=PrefixConfig(prefix_length=3))
    calls = []
    ptm.base.lm_head.register_forward_hook(lambda module, args, out: calls.append("forward"))
    trained = [p for p in ptm.parameters() if p.requires_grad]
    trained[0].register_hook(lambda grad: calls.append("backward"))
    work = train._train_workload(rows, cfg, torch.device("cpu"), 0, ptm)
    work.step()
    assert calls == ["forward", "backward"] and all(p.grad is None for p in ptm.parameters())
    assert work.key.startswith("train llama d48x2 L3 mlp b2 t")


def test_the_decode_workload_runs_lanes_rows_of_one_token():
    base = tiny_model("llama")
    shapes = []
    base.register_forward_hook(lambda module, args, kwargs, out: shapes.append(tuple(kwargs["input_ids"].shape)),
                               with_kwargs=True)
    work = api.decode_workload(base, lanes=20)
    work.step()
    assert shapes == [(20, 1)] and work.key == "decode llama d48x2 rows32"


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_frozen_linears_stored_in_bf16_give_autocast_s_exact_loss_and_gradients(family):
    def loss_and_grads(store: bool):
        torch.manual_seed(0)
        ptm = PrefixTuningModel(tiny_model(family), PrefixConfig(prefix_length=3))
        if store:
            assert precision.store_frozen_linears(ptm.base) > 0
            assert not any(p.dtype == torch.bfloat16 for p in ptm.parameters() if p.requires_grad)
        ids = torch.randint(0, 250, (2, 7), generator=torch.Generator().manual_seed(1))
        labels = ids.clone()
        labels[:, :3] = -100
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = train.TargetLoss(ptm)(ids, torch.ones_like(ids), labels)
        loss.backward()
        return loss.detach(), [p.grad for p in ptm.parameters() if p.requires_grad]

    (ref, ref_grads), (got, got_grads) = loss_and_grads(False), loss_and_grads(True)
    assert torch.equal(ref, got)
    assert all(torch.equal(a, b) for a, b in zip(ref_grads, got_grads))


def test_storing_frozen_linears_leaves_trainable_layers_and_embeddings_in_fp32():
    ptm = PrefixTuningModel(tiny_model("gpt2"), PrefixConfig(prefix_length=3))  # head tied to the embedding
    assert ptm.base.lm_head.weight is ptm.base.get_input_embeddings().weight
    precision.store_frozen_linears(ptm)
    assert ptm.base.lm_head.weight.dtype == torch.bfloat16
    assert ptm.base.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in ptm.parameters() if p.requires_grad)


def test_bf16_training_stores_the_frozen_linears_and_trains(tiny_dir, tmp_path, monkeypatch):
    stored = []
    real = precision.store_frozen_linears
    monkeypatch.setattr(precision, "store_frozen_linears", lambda model: stored.append(real(model)) or stored[-1])
    out = tmp_path / "run"
    assert main(["train", "--task", "e2e", "--model", tiny_dir, "--output", str(out), "--train-size", "24",
                 "--batch-size", "8", "--prefix-length", "4", "--mlp-hidden", "32", "--lr", "0.01", "--epochs", "2",
                 "--no-progress", "--bf16", "on"]) == 0
    assert stored and stored[0] > 0  # the frozen base's linear layers, once
    assert json.loads((out / "train_summary.json").read_text())["bf16"] is True
    assert all(torch.isfinite(t).all() for t in load_file(out / "prefix.safetensors").values())
