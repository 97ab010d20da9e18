"""1 process vs 2 DDP vs 2 FSDP2 processes (gloo, CPU) give the same prefix; --resume after SIGKILL under each.

The launches use the shipped configs/accelerate/*.yaml. Each 2-process launch of the tiny model takes ~15 s on
2 cores; the runs are shared by the tests through a module-scoped fixture.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import resume_step, save_tiny

psutil = pytest.importorskip("psutil", reason="the kill tests find the launch's workers with psutil ([dev] extra)")
from prefixtune.resume import STATE_NAME

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(sys.executable).parent / "accelerate"
CONFIGS = ROOT / "configs" / "accelerate"


def _gloo() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_gloo_available()


pytestmark = [
    pytest.mark.skipif(not LAUNCHER.exists(), reason=f"accelerate launcher not installed ({LAUNCHER} missing)"),
    pytest.mark.skipif(not _gloo(), reason="torch.distributed with the gloo backend is not available"),
]

# 24 pairs, batch 8: 3 steps per epoch, 24 steps; a checkpoint every step so that a kill lands mid-way
ARGS = ["--task", "e2e", "--train-size", "24", "--batch-size", "8", "--prefix-length", "4", "--mlp-hidden", "32",
        "--lr", "0.01", "--no-progress", "--bf16", "off", "--epochs", "8", "--eval-every", "6",
        "--resume-every", "1"]
MODES = {"single": [], "ddp": ["--config_file", str(CONFIGS / "ddp.yaml")],
         "fsdp": ["--config_file", str(CONFIGS / "fsdp.yaml")]}
LOG_LINE = {"single": "single over 1 process", "ddp": "ddp over 2 processes",
            "fsdp": "fsdp over 2 processes: frozen base sharded by fully_shard in 3 units"}


def _command(mode: str, model: str, out: Path, *extra: str) -> list[str]:
    train = ["-m", "prefixtune", "train", "--model", model, "--output", str(out), *ARGS, *extra]
    if mode == "single":
        return [sys.executable, *train]
    return [str(LAUNCHER), "launch", *MODES[mode], "--num_processes", "2", "--num_machines", "1",
            "--main_process_port", "0", *train]


def _start(mode: str, model: str, out: Path, *extra: str) -> subprocess.Popen:
    # one thread per process: two processes on 2 cores (and the tiny model gains nothing from threads)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    return subprocess.Popen(_command(mode, model, out, *extra), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_mid_way(proc: subprocess.Popen, out: Path) -> int:
    """SIGKILL the whole launch (launcher and its workers) once a state past step 4 is saved; returns the step
    of the state it left."""
    deadline = time.time() + 300
    while resume_step(out) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    # torchrun starts its workers in sessions of their own: kill each of the launch's processes by pid
    launch = psutil.Process(proc.pid)
    for child in [launch, *launch.children(recursive=True)]:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.communicate()
    return resume_step(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mode: (run dir, output)} of uninterrupted runs, and {mode: (run dir, state step at kill, output)}
    of runs killed mid-way and resumed."""
    tmp = tmp_path_factory.mktemp("distributed")
    model = save_tiny(tmp / "tiny-llama")
    full, resumed = {}, {}
    for mode in MODES:  # one launch at a time: two 2-process launches on 2 cores would crawl
        full[mode] = (tmp / f"full-{mode}", _finish(_start(mode, model, tmp / f"full-{mode}")))
    for mode in ("ddp", "fsdp"):
        out = tmp / f"killed-{mode}"
        at_kill = _kill_mid_way(_start(mode, model, out), out)
        resumed[mode] = (out, at_kill, _finish(_start(mode, model, out, "--resume")))
    return full, resumed


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / "prefix.safetensors"), load_file(b / "prefix.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_one_ddp_and_fsdp_processes_give_the_same_prefix(runs):
    full, _ = runs
    for mode, (_, output) in full.items():
        assert LOG_LINE[mode] in output, f"{mode}: {output[-3000:]}"  # FSDP really sharded, not DDP in disguise
    single = full["single"][0]
    assert _max_diff(single, full["ddp"][0]) < 1e-5
    assert _max_diff(single, full["fsdp"][0]) < 1e-5
    steps = json.loads((full["fsdp"][0] / "train_summary.json").read_text())["steps"]
    assert steps == 24


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sigkill_then_resume_gives_the_uninterrupted_prefix(runs, mode):
    full, resumed = runs
    out, at_kill, output = resumed[mode]
    assert 0 < at_kill < 24, f"the {mode} run was not interrupted mid-way (state at step {at_kill})"
    assert _max_diff(full[mode][0], out) < 1e-6, output[-3000:]
    a, b = load_file(full[mode][0] / STATE_NAME), load_file(out / STATE_NAME)
    assert a.keys() == b.keys() and max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-6
    rows = (out / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 25))
    # the resumed run continued the schedule: every step's lr equals the uninterrupted run's
    lrs = [r.split(",")[3] for r in (full[mode][0] / "metrics.csv").read_text().splitlines()[1:]]
    assert [r.split(",")[3] for r in rows] == lrs


def test_processes_agree_on_skipping_a_step(tmp_path):
    """One process sees a non-finite value, the other does not: both must take the same branch."""
    script = tmp_path / "agree.py"
    script.write_text(  # one file per process: their prints would interleave on a shared stdout
        "import sys\nfrom pathlib import Path\nfrom prefixtune import distributed\n"
        "acc = distributed.make_accelerator()\n"
        "mine = acc.process_index == 0\n"
        "seen = (acc.process_index, distributed.all_true(acc, mine), distributed.all_true(acc, True))\n"
        "Path(sys.argv[1], f'agree{acc.process_index}').write_text('agree %d %s %s' % seen)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    done = subprocess.run([str(LAUNCHER), "launch", *MODES["ddp"], "--num_processes", "2", "--num_machines", "1",
                           "--main_process_port", "0", str(script), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = sorted(path.read_text() for path in tmp_path.glob("agree?"))
    assert lines == ["agree 0 False True", "agree 1 False True"]


def test_shipped_accelerate_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    ddp, fsdp, zero3 = (load_config_from_file(str(CONFIGS / f"{n}.yaml")) for n in ("ddp", "fsdp", "deepspeed_zero3"))
    assert ddp.distributed_type == "MULTI_GPU"
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert zero3.distributed_type == "DEEPSPEED" and zero3.deepspeed_config["zero_stage"] == 3
