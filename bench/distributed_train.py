"""Training step time and peak memory: 1 process, 2 DDP processes, 2 FSDP2 processes, on one machine.

    python bench/distributed_train.py    # STEPS=12 by default; writes bench/results/distributed_train.{json,md}

A random Llama (6 layers, hidden 384, grouped-query attention; ~9.6M parameters, byte tokenizer) saved to a
temporary directory, trained by `prefixtune train` on E2E pairs through `accelerate launch` with the shipped
configs/accelerate/{ddp,fsdp}.yaml (CPU: gloo), fp32 (--bf16 off), the same global batch of 8 in every mode.
Step time: (elapsed at the last step - elapsed at step 1) / (steps - 1) from metrics.csv, so start-up and the
first step are left out (the final dev evaluation is recorded after the last elapsed value). Peak memory: the
largest resident set size (RSS) of each training process, polled every 50 ms with psutil. One process runs
with 2 threads, then with 1; each of two processes with 1 (OMP_NUM_THREADS). The modes run one after the other.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import _SPECIAL, VOCAB, byte_tokenizer  # noqa: E402
from e2e_main import machine  # noqa: E402

OUT = ROOT / "bench" / "results"
LAUNCHER = Path(sys.executable).parent / "accelerate"
CONFIGS = ROOT / "configs" / "accelerate"
MODES = [("single", 1, 2, []), ("single", 1, 1, []), ("ddp", 2, 1, ["--config_file", str(CONFIGS / "ddp.yaml")]),
         ("fsdp", 2, 1, ["--config_file", str(CONFIGS / "fsdp.yaml")])]


def save_model(path: Path) -> int:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                                      **_SPECIAL)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def _workers(root: psutil.Process, single: bool) -> list[psutil.Process]:
    """The training processes: the process itself (one process), or the launcher's children running
    `-m prefixtune` (torchrun's workers; not their own forked helpers, which share their memory)."""
    if single:
        return [root]
    found = []
    for child in root.children(recursive=False):
        try:
            if "prefixtune" in child.cmdline():
                found.append(child)
        except psutil.Error:
            continue
    return found


def run_mode(mode: str, procs: int, threads: int, launch: list[str], model: str, out: Path, steps: int) -> dict:
    args = ["-m", "prefixtune", "train", "--task", "e2e", "--model", model, "--output", str(out), "--train-size", "48",
            "--batch-size", "8", "--prefix-length", "10", "--lr", "5e-5", "--bf16", "off", "--no-progress",
            "--max-steps", str(steps), "--epochs", "100", "--eval-every", "1000", "--resume-every", "1000"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, *args] if procs == 1 else [
        str(LAUNCHER), "launch", *launch, "--num_processes", str(procs), "--num_machines", "1",
        "--main_process_port", "0", *args]
    log = out.with_suffix(".log")
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        peak: dict[int, int] = {}
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            for worker in _workers(root, procs == 1):
                try:
                    peak[worker.pid] = max(peak.get(worker.pid, 0), worker.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.05)
    text = log.read_text()
    if proc.returncode:
        raise SystemExit(f"{mode} failed (exit {proc.returncode}):\n{text[-4000:]}")
    with (out / "metrics.csv").open() as f:
        elapsed = [float(r["elapsed_s"]) for r in csv.DictReader(f)]
    held = re.search(r"this process holds ([\d,]+) of its ([\d,]+) numbers", text)
    return {"mode": mode, "processes": procs, "threads_per_process": threads, "steps": len(elapsed),
            "step_seconds": round((elapsed[-1] - elapsed[0]) / (len(elapsed) - 1), 3),
            "peak_rss_mb_per_process": sorted(round(v / 2**20) for v in peak.values()),
            "base_numbers_held_per_process": int(held.group(1).replace(",", "")) if held else None}


def markdown(result: dict) -> str:
    lines = [f"# Distributed training: 1 process, DDP, FSDP2 ({result['machine']})", "",
             f"Model: {result['model']}. {result['setup']}", "",
             "| mode | processes | threads/process | step (s) | peak RSS per process (MB) "
             "| frozen base numbers held per process |",
             "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        held = r["base_numbers_held_per_process"] or result["base_parameters"]
        lines.append(f"| {r['mode']} | {r['processes']} | {r['threads_per_process']} | {r['step_seconds']} | "
                     f"{', '.join(map(str, r['peak_rss_mb_per_process']))} | {held:,} |")
    lines += ["", result["note"], ""]
    return "\n".join(lines)


def main() -> int:
    steps = int(os.environ.get("STEPS", "12"))
    with tempfile.TemporaryDirectory(prefix="prefixtune-dist-") as tmp:
        model = Path(tmp) / "llama-9m"
        n = save_model(model)
        runs = [run_mode(mode, procs, threads, launch, str(model), Path(tmp) / f"{mode}-{threads}", steps)
                for mode, procs, threads, launch in MODES]
    result = {
        "command": "python bench/distributed_train.py" + (f" STEPS={steps}" if "STEPS" in os.environ else ""),
        "machine": machine(), "torch": torch.__version__, "accelerate": __import__("accelerate").__version__,
        "model": f"random Llama, 6 layers, hidden 384, 6 heads / 2 kv heads, {n / 1e6:.1f}M parameters (fp32)",
        "base_parameters": n,
        "setup": (f"{steps} optimizer steps of a global batch of 8 E2E pairs, L=10 prefix with MLP (hidden 512), "
                  "fp32, CPU with gloo; step time excludes start-up and the first step."),
        "runs": runs,
        "note": (f"On {os.cpu_count()} CPU cores two 1-thread processes use the cores one 2-thread process would, and "
                 "add gloo all-reduces (DDP) or per-layer all-gathers (FSDP) to each step: no speed-up is expected. "
                 "What is measured is that the modes run and what each process holds. RSS includes a few hundred MB "
                 f"of Python/torch per process, next to which this model's {n * 4 / 2**20:.0f} MB of weights is small, "
                 "and every process still loads the whole base before FSDP shards it, so the peak does not show the "
                 "halved base. One process with 2 threads is much slower than with 1 here: the machine also runs a "
                 "background job at nice 19, and a 2-thread process waits for its stalled thread in every op "
                 "(DESIGN.md section 7)."),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "distributed_train.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "distributed_train.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
