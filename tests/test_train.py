"""Training from the command line on a tiny model: loss falls, resume after SIGKILL, 2-process DDP."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import resume_step
from prefixtune.cli import main
from prefixtune.config import PrefixConfig, TrainConfig
from prefixtune.resume import STATE_NAME
from prefixtune.tasks import TASKS, TrainDefaults
from prefixtune.train import lr_at, resolve

ROOT = Path(__file__).resolve().parents[1]


def _train_args(model_dir, out, *extra):
    # --bf16 off: with "auto", runs compared with each other could each time bf16 on a busy machine and decide
    # differently (a flaky comparison of two precisions); a test of precision passes --bf16 itself (last wins)
    return ["train", "--task", "e2e", "--model", model_dir, "--output", str(out), "--train-size", "24",
            "--batch-size", "8", "--prefix-length", "4", "--mlp-hidden", "32", "--lr", "0.01", "--bf16", "off",
            "--no-progress", *extra]


def _run(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen([sys.executable, "-m", "prefixtune", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_cli_train_loss_falls_then_generate_and_score(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(tiny_dir, out, "--epochs", "6", "--eval-every", "3")) == 0
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert len(losses) == 18 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    for name in ("prefix.safetensors", "prefix_config.json", "loss_curve.png", "train_summary.json"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "prefix_config.json").read_text())
    assert meta["training"]["task"] == "e2e" and meta["training"]["train_size"] == 24

    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"task": "e2e", "input": "name[The Eagle], food[French]"}\n{"task": null, "input": "hi"}\n')
    assert main(["generate", "--model", tiny_dir, "--prefix", f"e2e={out}", "--input", str(inputs),
                 "--output", str(tmp_path / "out.jsonl"), "--num-beams", "2", "--max-new-tokens", "6"]) == 0
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [x["task"] for x in lines] == ["e2e", None] and all("output" in x for x in lines)

    capsys.readouterr()
    assert main(["evaluate", "--model", tiny_dir, "--prefix", str(out), "--task", "e2e", "--limit", "3",
                 "--output", str(tmp_path / "eval"), "--num-beams", "1", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert "bleu" in printed and "cider" in printed
    report = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert report["sources"] == 3 and set(report["scores"]) >= {"bleu", "nist", "rouge_l", "cider"}
    assert len((tmp_path / "eval" / "predictions.txt").read_text().splitlines()) == 3


def test_sigkill_then_resume_gives_the_same_prefix(tiny_dir, tmp_path):
    args = ["--epochs", "12", "--resume-every", "1", "--eval-every", "6"]
    full = _run(_train_args(tiny_dir, tmp_path / "full", *args))
    killed = _run(_train_args(tiny_dir, tmp_path / "killed", *args))
    deadline = time.time() + 300
    while resume_step(tmp_path / "killed") < 7 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    at_kill = resume_step(tmp_path / "killed")
    assert 0 < at_kill < 36, f"the run was not interrupted mid-way (state at step {at_kill})"
    resumed = _run(_train_args(tiny_dir, tmp_path / "killed", *args, "--resume"))
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    assert full.wait(timeout=600) == 0, full.stdout.read()
    a, b = load_file(tmp_path / "full" / "prefix.safetensors"), load_file(tmp_path / "killed" / "prefix.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = load_file(tmp_path / "full" / STATE_NAME), load_file(tmp_path / "killed" / STATE_NAME)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [int(r.split(",")[0]) for r in (tmp_path / "killed" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 37))


@pytest.mark.skipif(shutil.which("accelerate") is None and not (Path(sys.executable).parent / "accelerate").exists(),
                    reason="accelerate launcher not installed")
def test_two_process_ddp_equals_one_process(tiny_dir, tmp_path):
    args = ["--epochs", "2", "--bf16", "off", "--eval-every", "100"]
    single = _run(_train_args(tiny_dir, tmp_path / "one", *args))
    assert single.wait(timeout=600) == 0, single.stdout.read()
    launcher = str(Path(sys.executable).parent / "accelerate")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    # not `--cpu`: accelerate 1.15 then starts a single process whatever --num_processes says; the config file
    # goes through torchrun, and on a machine without GPUs the processes use gloo
    two = subprocess.run([launcher, "launch", "--config_file", str(ROOT / "configs" / "accelerate" / "ddp.yaml"),
                          "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
                          "-m", "prefixtune", *_train_args(tiny_dir, tmp_path / "two", *args)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "ddp over 2 processes" in two.stdout + two.stderr  # two processes really ran
    a, b = load_file(tmp_path / "one" / "prefix.safetensors"), load_file(tmp_path / "two" / "prefix.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_resolve_fills_paper_defaults_and_rejects_bad_values():
    cfg = resolve(TrainConfig(task="webnlg"))
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.prefix.prefix_length) == (5e-5, 5, 5, 5)
    assert resolve(TrainConfig(task="e2e", train_size=100)).lr == 5e-5
    with pytest.raises(ValueError, match="unknown task 'xsum'; known tasks: e2e, webnlg, dart, jsonl, summarization"):
        resolve(TrainConfig(task="xsum"))
    with pytest.raises(ValueError, match="not divisible by grad_accum 3"):
        resolve(TrainConfig(batch_size=10, grad_accum=3))
    with pytest.raises(ValueError, match="lr must be > 0"):
        resolve(TrainConfig(lr=-1.0))
    with pytest.raises(ValueError, match="reparam must be one of"):  # the prefix is checked before any loading
        resolve(TrainConfig(prefix=PrefixConfig(prefix_length=None, reparam="lstm")))


@pytest.mark.parametrize("task", list(TASKS))
def test_resolve_takes_each_tasks_recipe_from_its_spec(task):
    recipe = TASKS[task].defaults
    cfg = resolve(TrainConfig(task=task, seed=3))
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.prefix.prefix_length) == (
        recipe.lr, recipe.epochs, recipe.batch_size, recipe.prefix_length)
    assert cfg.prefix.seed == 3  # one seed for the subsample, the data order and the prefix
    low = resolve(TrainConfig(task=task, train_size=50))
    assert (low.lr, low.batch_size, low.epochs, low.prefix.prefix_length) == (
        5e-5, 10, recipe.epochs, recipe.prefix_length)


def test_resolve_keeps_explicit_values_and_reads_a_newly_registered_spec(monkeypatch):
    toy = dataclasses.replace(TASKS["jsonl"], name="toy",
                              defaults=TrainDefaults(lr=1e-2, epochs=2, batch_size=4, prefix_length=3))
    monkeypatch.setitem(TASKS, "toy", toy)
    cfg = resolve(TrainConfig(task="toy"))
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.prefix.prefix_length) == (1e-2, 2, 4, 3)
    given = PrefixConfig(prefix_length=7, init_fit_steps=9)
    cfg = resolve(TrainConfig(task="toy", lr=0.5, epochs=1, batch_size=2, prefix=given))
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.prefix.prefix_length, cfg.prefix.init_fit_steps) == (0.5, 1, 2, 7, 9)
    assert given.seed == 0 and given.prefix_length == 7  # the caller's config is not changed


def test_prefix_options_from_the_cli_reach_the_trained_prefix(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--task", "e2e", "--model", tiny_dir, "--output", str(out), "--train-size", "8",
                 "--batch-size", "8", "--max-steps", "1", "--mlp-hidden", "8", "--seed", "3", "--no-progress",
                 "--init-fit-steps", "7", "--init-fit-lr", "0.002", "--variant", "infix"]) == 0
    saved = json.loads((out / "prefix_config.json").read_text())["prefix_config"]
    assert (saved["init_fit_steps"], saved["init_fit_lr"]) == (7, 0.002)
    assert (saved["variant"], saved["mlp_hidden"]) == ("infix", 8)
    assert saved["seed"] == 3 and saved["prefix_length"] == TASKS["e2e"].defaults.prefix_length


def test_lr_schedule_warmup_then_linear_decay():
    cfg = TrainConfig(lr=1.0, warmup_steps=4)
    assert [round(lr_at(s, cfg, 10), 3) for s in (0, 3, 4, 7, 10)] == [0.25, 1.0, 1.0, 0.5, 0.0]


def test_resume_without_state_is_refused(tiny_dir, tmp_path, capsys):
    assert main(_train_args(tiny_dir, tmp_path / "none", "--resume")) == 2
    assert "holds no resume state" in capsys.readouterr().err


def test_encoder_decoder_summarization_from_jsonl_files(tmp_path):
    from conftest import save_tiny

    model_dir = save_tiny(tmp_path / "bart", "bart")
    rows = [{"document": f"document number {i} talks about topic {i % 3}", "summary": f"topic {i % 3}"}
            for i in range(12)]
    train_file, dev_file = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    dev_file.write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    out = tmp_path / "run"
    assert main(["train", "--task", "summarization", "--model", model_dir, "--train-file", str(train_file),
                 "--dev-file", str(dev_file), "--output", str(out), "--epochs", "2", "--batch-size", "5",
                 "--prefix-length", "3", "--mlp-hidden", "16", "--no-progress"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and "2 dev pairs" in summary["data"]
    meta = json.loads((out / "prefix_config.json").read_text())
    assert {k.split(".")[0] for k in load_file(out / "prefix.safetensors")} == {"encoder", "self", "cross"}
    assert meta["base_model"]["model_type"] == "bart"
    assert main(["evaluate", "--model", model_dir, "--prefix", str(out), "--task", "summarization",
                 "--file", str(dev_file), "--split", "dev", "--output", str(tmp_path / "eval"),
                 "--num-beams", "2", "--max-new-tokens", "4", "--min-new-tokens", "1"]) == 0
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())["scores"]
    assert set(scores) == {"rouge1", "rouge2", "rougeL"}


def test_webnlg_evaluate_reports_seen_unseen_all(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task", "webnlg", "--model", tiny_dir, "--output", str(out), "--train-size", "10",
                 "--batch-size", "5", "--max-steps", "2", "--prefix-length", "2", "--mlp-hidden", "8",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", tiny_dir, "--prefix", str(out), "--task", "webnlg", "--limit", "3",
                 "--output", str(tmp_path / "eval"), "--num-beams", "1", "--max-new-tokens", "4", "--min-new-tokens", "1"]) == 0
    printed = capsys.readouterr().out
    assert "seen" in printed and "unseen" in printed and "all" in printed


@pytest.mark.parametrize("options", [["--variant", "infix"], ["--reparam", "embedding", "--init-text", "table-to-text:"],
                                     ["--reparam", "table", "--grad-accum", "2"]])
def test_ablation_variants_train_save_and_generate(tiny_dir, tmp_path, options):
    out = tmp_path / "run"
    assert main(_train_args(tiny_dir, out, "--max-steps", "2", *options)) == 0
    meta = json.loads((out / "prefix_config.json").read_text())
    assert meta["prefix_config"]["reparam"] == (options[1] if options[0] == "--reparam" else "mlp")
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"task": "t", "input": "name[The Eagle]"}\n')
    assert main(["generate", "--model", tiny_dir, "--prefix", f"t={out}", "--input", str(inputs),
                 "--output", str(tmp_path / "out.jsonl"), "--max-new-tokens", "5"]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert set(record) == {"task", "input", "output"} and (record["task"], record["input"]) == ("t", "name[The Eagle]")
    # the written output is the text the saved prefix generates through the library, not a placeholder
    from prefixtune.config import GenerateConfig
    from prefixtune.base_model import load_base_model
    from prefixtune.multi import MultiPrefixModel

    multi = MultiPrefixModel(*load_base_model(tiny_dir))
    multi.add("t", out)
    (expected,) = multi.generate(["name[The Eagle]"], ["t"], GenerateConfig(max_new_tokens=5))
    assert isinstance(expected, str) and expected and record["output"] == expected


def test_gradient_checkpointing_recomputes_each_layer_and_trains_the_same_prefix(tiny_dir, tmp_path, monkeypatch):
    """--gradient-checkpointing: every layer's attention runs again in backward (more attention calls for the
    same steps), and the trained prefix equals the one trained without it (the tiny Llama has no dropout)."""
    from transformers.models.llama import modeling_llama

    calls = {"n": 0}
    real = modeling_llama.LlamaAttention.forward  # the layer's own forward is captured when checkpointing is enabled

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", counted)
    seen = {}
    for flag in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        calls["n"] = 0
        out = tmp_path / flag
        assert main(["train", "--model", tiny_dir, "--task", "e2e", "--train-size", "24", "--batch-size", "8",
                     "--max-steps", "3", "--eval-every", "3", "--prefix-length", "2", "--mlp-hidden", "8",
                     "--lr", "0.01", "--bf16", "off", "--no-progress", "--output", str(out), flag]) == 0
        seen[flag] = (calls["n"], load_file(out / "prefix.safetensors"))
    (plain, a), (ckpt, b) = seen["--no-gradient-checkpointing"], seen["--gradient-checkpointing"]
    assert ckpt - plain == 3 * 2 * 1  # 3 steps x 2 layers x 1 batch: each layer recomputed once per backward
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
