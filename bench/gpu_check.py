"""Everything that needs a GPU, in one run of at most 10 minutes (scripts/gpu_check.sh calls it there).

    python bench/gpu_check.py --device cuda --data .gpu_data --out "$OUT" --keep   # on the GPU machine
    python bench/gpu_check.py --device cpu --quick --out /tmp/gpu-check            # here: checks the script itself

The GPU machine cannot hold the default model's file, so the model is SmolLM2-135M's shape (Llama, 30 layers,
width 576, 9 query and 3 key/value heads, vocabulary 49152) with random weights and a byte-level tokenizer:
speeds are the real model's, scores are meaningless (and are not reported). Parts, each timed and recorded
even when another fails:
  tests     the suite's device-parametrised tests (ids containing the device's name, e.g. `[cuda]`)
  main job  `prefixtune train` on 200 E2E pairs, then `prefixtune generate` (beam 5) for test MRs, on the device
  decode    beam-5 decoding, prefixtune's engine against transformers' generate (bench/decode_speed.py's loop),
            with fp32 and with bf16 weights
  serve     bench/serve_bench.py against the random model, its servers on the device
  zero3     `accelerate launch` with configs/accelerate/deepspeed_zero3.yaml, 1 process (one GPU), a few
            training steps of the model (needs deepspeed: scripts/gpu_check.sh --prepare builds its wheel)
  probe_two_process_nccl, two_process_gloo
            two processes on the one GPU, an all_reduce of CUDA tensors: NCCL refuses two ranks on one device
            (a probe: expected to fail, recorded, not counted); gloo takes CUDA tensors, so it is how two
            processes can share one GPU (on --device cpu only the gloo part runs)
Parts run in this order within --budget-s (default 540 s); a part with too little time left is recorded as
skipped, so the report is always written. Writes gpu_check.json and gpu_check.md into --out (and into
bench/results/ with --keep).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests")]

#: SmolLM2-135M-Instruct's shape (its config.json), random weights
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                     tie_word_embeddings=True, rms_norm_eps=1e-5)


def write_model(path: Path, quick: bool) -> str:
    """A random model of SmolLM2's shape (2 layers with --quick) and the tests' byte tokenizer, saved as a
    local model directory."""
    import torch
    import transformers
    from conftest import BOS, EOS, PAD, byte_tokenizer

    torch.manual_seed(0)
    shape = {**SMOLLM2_SHAPE, **({"num_hidden_layers": 2} if quick else {})}
    config = transformers.LlamaConfig(**shape, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


DEADLINE = [float("inf")]
"""time.time() by which every part must be done (main sets it from --budget-s)."""
MIN_PART_S = 20.0
"""A part that would get less time than this before DEADLINE is skipped (recorded as such), not started."""


def part_timeout(timeout: float, now: float | None = None) -> float | None:
    """`timeout`, shortened to what is left before DEADLINE (keeping 10 s for the report); None: skip the part."""
    left = DEADLINE[0] - (time.time() if now is None else now) - 10.0
    return None if left < MIN_PART_S else min(timeout, left)


def timed(name: str, cmd: list[str], results: dict, timeout: float, env: dict | None = None) -> bool:
    """Run one part as a subprocess; record its exit code, seconds and output tail."""
    timeout = part_timeout(timeout)
    if timeout is None:
        results[name] = {"command": " ".join(cmd), "exit_code": "skipped: out of time", "seconds": 0}
        print(f"[gpu_check] {name}: skipped, out of time", flush=True)
        return False
    print(f"[gpu_check] {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=timeout,
                              env=None if env is None else {**os.environ, **env})
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, output = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
    results[name] = {"command": " ".join(cmd), "exit_code": code, "seconds": round(time.time() - start, 1),
                     "output_tail": output[-1500:]}
    print(output[-1500:], flush=True)
    return code == 0


def write_inputs(path: Path, n: int) -> None:
    """The first n E2E test MRs as `prefixtune generate` input (the main job's decoding, without the metrics
    extra, which the GPU image lacks)."""
    from prefixtune.tasks import load_groups

    rows = [{"task": "e2e", "input": g.source} for g in load_groups("e2e", "test")[:n]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def decode_speed(model_dir: str, device: str, sources: int, repeats: int) -> dict:
    """prefixtune's engine vs transformers' generate, beam 5, a random prefix, fp32 and bf16 weights."""
    import torch
    from decode_speed import decode_all
    from prefixtune import GenerateConfig, MultiPrefixModel, PrefixConfig, PrefixTuningModel
    from prefixtune.decoding import decoding_kwargs, encode_sources
    from prefixtune.base_model import load_base_model
    from prefixtune.tasks import load_groups

    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        base, tokenizer = load_base_model(model_dir, dtype=dtype, device=device)
        multi = MultiPrefixModel(base, tokenizer)
        prefix = PrefixTuningModel(base, PrefixConfig(prefix_length=10, reparam="table")).prefix_kv().detach()
        multi.add("e2e", prefix.to(device=device, dtype=dtype))
        fmt = multi.tasks()["e2e"].text_format
        texts = [g.source for g in load_groups("e2e", "test")[:sources]]
        batches = [tuple(t.to(device) for t in encode_sources(tokenizer, base, texts[i : i + 32],
                                                              [fmt] * len(texts[i : i + 32])))
                   for i in range(0, len(texts), 32)]
        kwargs = decoding_kwargs(tokenizer, GenerateConfig(num_beams=5, max_new_tokens=40, min_new_tokens=40))
        times, outputs = {"prefixtune": [], "transformers": []}, {}
        for _ in range(repeats):
            for name, once in (("prefixtune", True), ("transformers", False)):
                seconds, outputs[name] = decode_all(multi, batches, kwargs, once)
                times[name].append(round(seconds, 3))
        best = {k: min(v) for k, v in times.items()}
        out[str(dtype).removeprefix("torch.")] = {
            "seconds": times, "speedup_vs_transformers": round(best["transformers"] / best["prefixtune"], 3),
            "identical_outputs": outputs["prefixtune"] == outputs["transformers"]}
    return out


def _all_reduce_rank(rank: int, backend: str, port: int, device: str) -> None:
    """One of two processes: all_reduce [rank + 1] * 4 on `device` (both ranks on the same one); checks 1 + 2."""
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        tensor = torch.full((4,), float(rank + 1), device=device)
        dist.all_reduce(tensor)
        if tensor.tolist() != [3.0] * 4:
            raise RuntimeError(f"rank {rank}: all_reduce gave {tensor.tolist()}, not [3.0] * 4")
        print(f"rank {rank}: {backend} all_reduce on {tensor.device} ok", flush=True)
    finally:
        dist.destroy_process_group()


def two_processes(backend: str, device: str) -> int:
    """Two processes, one device (`--two-process BACKEND`): 0 when their all_reduce adds up, else the error."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_all_reduce_rank, args=(backend, port, device), nprocs=2, join=True)  # raises when a rank fails
    return 0


def zero3_command(model: str, out: Path, steps: str) -> list[str]:
    """`accelerate launch` of configs/accelerate/deepspeed_zero3.yaml on 1 process (`python -m`: the GPU image's
    accelerate may come from .whl/, without its console script on PATH)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"), "--num_processes", "1",
            "--num_machines", "1", "--main_process_port", "0", "-m", "prefixtune", "train", "--model", model,
            "--task", "e2e", "--train-size", "40", "--max-steps", steps, "--batch-size", "8", "--eval-every", steps,
            "--bf16", "off", "--output", str(out), "--no-progress"]


def facts(device: str) -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"device": device, "gpu": gpu, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--data", default=None, help="data root holding e2e/ (default: the usual data lookup)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="2 layers, few steps: checks this script, not the GPU")
    p.add_argument("--keep", action="store_true", help="also write the results into bench/results/")
    p.add_argument("--budget-s", type=float, default=540.0, help="all parts within this long (default 540)")
    p.add_argument("--two-process", choices=("nccl", "gloo"), default=None,
                   help="only the two-process probe with this backend on --device (what the probe parts run)")
    args = p.parse_args()
    if args.two_process:
        return two_processes(args.two_process, args.device)
    DEADLINE[0] = time.time() + args.budget_s
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if args.data:  # the children (train, generate, serve_bench) read the data root from here
        os.environ["PREFIXTUNE_DATA"] = str(Path(args.data).resolve())
    results: dict = {"facts": facts(args.device)}
    model = write_model(work / "model", args.quick)
    steps, limit = ("4", 4) if args.quick else ("200", 64)
    cli = [sys.executable, "-m", "prefixtune"]
    timed("tests", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                    "-k", args.device.split(":")[0], "tests/test_devices.py"] if args.quick else
          [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests/"],
          results, timeout=120 if args.quick else 200)
    if timed("train", cli + ["train", "--model", model, "--device", args.device, "--task", "e2e", "--train-size",
                             "200", "--max-steps", steps, "--batch-size", "10", "--eval-every", steps,
                             "--output", str(work / "run"), "--no-progress"], results, timeout=240):
        write_inputs(work / "inputs.jsonl", limit)
        timed("generate", cli + ["generate", "--model", model, "--device", args.device, "--prefix",
                                 f"e2e={work / 'run'}", "--input", str(work / "inputs.jsonl"), "--output",
                                 str(work / "outputs.jsonl"), "--num-beams", "5"], results, timeout=180)
    start = time.time()
    try:
        results["decode"] = decode_speed(model, args.device, 8 if args.quick else 64, 1 if args.quick else 3)
    except Exception as err:  # recorded; the other parts still run
        results["decode"] = {"error": f"{type(err).__name__}: {err}"}
    results["decode"]["seconds"] = round(time.time() - start, 1)
    timed("serve", [sys.executable, "bench/serve_bench.py", "--model", model, "--rounds", "1", "--requests",
                    "8" if args.quick else "64", "--server-args", f"--device {args.device}", "--out", str(work)],
          results, timeout=240)
    distributed_parts(args, model, work, results)
    report(results, args.out, ROOT / "bench" / "results" if args.keep else None)
    parts_ok = all(r["exit_code"] == 0 for k, r in results.items() if "exit_code" in r and not k.startswith("probe_"))
    return 0 if parts_ok and "error" not in results["decode"] else 1


def distributed_parts(args: argparse.Namespace, model: str, work: Path, results: dict) -> None:
    """ZeRO-3 on one process (CUDA only: DeepSpeed is GPU-only here), then two processes on the one device."""
    probe = [sys.executable, str(Path(__file__).resolve()), "--out", str(work), "--device", args.device, "--two-process"]
    if args.device.startswith("cuda"):
        timed("zero3", zero3_command(model, work / "zero3", "5"), results, timeout=180,
              env={"DS_ACCELERATOR": "cuda"})  # the wheel was built on a CPU machine: name the accelerator
        timed("probe_two_process_nccl", probe + ["nccl"], results, timeout=90)
    timed("two_process_gloo", probe + ["gloo"], results, timeout=90)


def report(results: dict, *folders: Path | None) -> None:
    f = results["facts"]
    lines = [f"# GPU check ({f['device']}: {f['gpu'] or 'no GPU'}, torch {f['torch']}, {f['started']})", "",
             "| part | exit code | seconds |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['exit_code']} | {v['seconds']} |" for k, v in results.items() if "exit_code" in v]
    if "error" in results["decode"]:
        lines.append(f"\nDecode failed: {results['decode']['error']}")
    for dtype, d in results["decode"].items():
        if isinstance(d, dict):
            lines.append(f"\nDecode, beam 5, {dtype} weights: {d['speedup_vs_transformers']}x transformers' generate "
                         f"(seconds {d['seconds']}), identical outputs: {d['identical_outputs']}")
    lines += ["", "Command: `bash scripts/gpu_check.sh` (bench/gpu_check.py)"]
    for folder in filter(None, folders):
        (folder / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
        (folder / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
