"""Low-data E2E (the paper's Table/Figure: prefix-tuning vs fine-tuning with 50-500 training pairs).

    python bench/lowdata.py                    # sizes 50 200, seed 0, 100 optimizer steps, first 100 test MRs
    SIZES="50 100 200 500" SEEDS="0 1" STEPS=200 LIMIT=630 METHODS="prefix finetune" python bench/lowdata.py

Both methods see the same subsample, batch size, number of steps, text format and decoding (greedy; the
paper uses beam 5) on SmolLM2-135M-Instruct; only what is trained differs: the prefix (MLP
reparametrisation, lr 5e-4, initialised from the activations of "table-to-text:" as in the paper, so L is
that text's token count; "prefix-random" is the same with random init and L=10, "prefix-random-same-L"
random init with the word prefix's L) or every weight of the model (lr 5e-5, the paper's fine-tuning rate).
Scores are the official E2E metrics. Writes bench/results/lowdata.json and lowdata.md. Each finished run
is kept in the JSON, so an interrupted bench resumes where it stopped. Other STEPS or LIMIT write to
lowdata-steps{STEPS}-limit{LIMIT}.json/.md, so runs with different settings never mix.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from e2e_main import machine  # noqa: E402

from prefixtune import GenerateConfig, MultiPrefixModel, load_base_model, precision  # noqa: E402
from prefixtune.config import PrefixConfig, TextFormat, TrainConfig  # noqa: E402
from prefixtune.data import collate, encode, epoch_order  # noqa: E402
from prefixtune.evaluate import score  # noqa: E402
from prefixtune.tasks import load_groups, low_data_split  # noqa: E402
from prefixtune.train import train  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"
INIT_TEXT = "table-to-text:"
# bf16 autocast only where it is measured faster than fp32 (precision.py); recorded per run.
BF16 = precision.bf16_wanted("auto", torch.device("cpu"))
# Runs recorded before the machine was kept per run all ran on this one (bf16 autocast).
EARLIER_MACHINE = "AMD EPYC (bf16 units), 2 cores, Linux x86_64, no GPU"


def _evaluate(base, tok, prefix_dir, groups, task: str = "e2e") -> dict:
    """Greedy outputs for `groups` (with the prefix in `prefix_dir`, or none) and their official scores."""
    multi = MultiPrefixModel(base, tok)
    name = None
    if prefix_dir is not None:
        multi.add(task, prefix_dir)
        name = task
    start = time.time()
    preds = multi.generate([g.source for g in groups], [name] * len(groups),
                           GenerateConfig(num_beams=1, batch_size=32, bf16="auto"))
    return {"scores": score(task, preds, groups), "generation_seconds": round(time.time() - start, 1),
            "sample": preds[:2], "bf16": BF16, "machine": machine()}


def run_prefix(size: int, seed: int, steps: int, groups: list, init_text: str | None = INIT_TEXT,
               task: str = "e2e", prefix_length: int = 10) -> dict:
    """The paper's low-data prefix: initialised from the activations of "table-to-text:" (L = its tokens)."""
    variant = "" if init_text else "-random" if prefix_length == 10 else f"-random-L{prefix_length}"
    out = ROOT / "runs" / f"{'lowdata' if task == 'e2e' else task}-prefix{variant}-{size}-{seed}"
    prefix = PrefixConfig(prefix_length=prefix_length, init_text=init_text)
    summary = train(TrainConfig(task=task, train_size=size, seed=seed, output=str(out), prefix=prefix,
                                lr=5e-4, batch_size=10, epochs=10_000, max_steps=steps,
                                eval_every=max(1, steps // 5), progress=False))
    base, tok = load_base_model()
    return {"train_seconds": summary["train_seconds"], "trained_parameters": summary["prefix_parameters"],
            **_evaluate(base, tok, out, groups, task)}


def _run_prefix_random(size: int, seed: int, steps: int, groups: list, task: str = "e2e") -> dict:
    """Ablation: the same prefix with random init, L=10."""
    return run_prefix(size, seed, steps, groups, init_text=None, task=task)


def run_finetune(size: int, seed: int, steps: int, groups: list, task: str = "e2e") -> dict:
    """Full fine-tuning with the same data, steps and loss (target tokens only); no keep-best."""
    torch.manual_seed(seed)
    base, tok = load_base_model()
    train_ex, _ = low_data_split(load_groups(task, "train"), size, seed)
    rows = encode(train_ex, tok, TextFormat(), encoder_decoder=False)
    optimizer = torch.optim.AdamW(base.parameters(), lr=5e-5, weight_decay=0.0)
    start, per_epoch = time.time(), len(rows) // 10
    for step in range(steps):
        epoch, index = divmod(step, per_epoch)
        order = epoch_order(len(rows), seed, epoch)[index * 10 : (index + 1) * 10]
        batch = collate([rows[i] for i in order], tok.pad_token_id, False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=BF16):
            loss = base(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(base.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = 5e-5 * (steps - step) / steps
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    train_seconds = round(time.time() - start, 1)
    base.eval()
    return {"train_seconds": train_seconds, "trained_parameters": sum(p.numel() for p in base.parameters()),
            **_evaluate(base, tok, None, groups, task)}


def _run_prefix_random_same_length(size: int, seed: int, steps: int, groups: list, task: str = "e2e") -> dict:
    """Ablation that separates init from length: random init with L = the init text's token count."""
    _, tok = load_base_model()
    length = len(tok(INIT_TEXT, add_special_tokens=False).input_ids)
    return run_prefix(size, seed, steps, groups, init_text=None, task=task, prefix_length=length)


METHODS = {"prefix": run_prefix, "prefix-random": _run_prefix_random,
           "prefix-random-same-L": _run_prefix_random_same_length, "finetune": run_finetune}


def _mean_table(results: dict) -> list[str]:
    """Mean BLEU over seeds per (pairs, method): single seeds at 50 pairs differ by ~10 BLEU."""
    groups: dict[tuple[int, str], list[float]] = {}
    for key, r in results.items():
        size, _, method = key.split("/")
        groups.setdefault((int(size), method), []).append(r["scores"]["bleu"])
    lines = ["| train pairs | method | seeds | mean BLEU | min | max |", "|---:|---|---:|---:|---:|---:|"]
    for (size, method), bleus in sorted(groups.items()):
        lines.append(f"| {size} | {method} | {len(bleus)} | {sum(bleus) / len(bleus):.2f} | {min(bleus):.2f} "
                     f"| {max(bleus):.2f} |")
    return lines


def precision_note(results: dict) -> str:
    """Which machine and precision each run had: runs are resumed across sessions on different machines."""
    by_setting: dict[str, list[str]] = {}
    for key, r in sorted(results.items()):
        where = r.get("machine", EARLIER_MACHINE)
        by_setting.setdefault(f"{where}, {'bf16 autocast' if r.get('bf16', True) else 'fp32'}", []).append(key)
    if len(by_setting) == 1:
        return f"Machine: {next(iter(by_setting))}"
    return "Machines: " + "; ".join(f"{setting}: {', '.join(keys)}" for setting, keys in by_setting.items())


def write_table(results: dict, meta: dict, path: Path) -> None:
    lines = ["| train pairs | seed | method | trained params | BLEU | NIST | METEOR | ROUGE-L | CIDEr | train s |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key in sorted(results, key=lambda k: (int(k.split("/")[0]), int(k.split("/")[1]), k.split("/")[2])):
        size, seed, method = key.split("/")
        r, s = results[key], results[key]["scores"]
        lines.append(f"| {size} | {seed} | {method} | {r['trained_parameters']:,} | {s['bleu']:.2f} | {s['nist']:.2f} "
                     f"| {s['meteor']:.2f} | {s['rouge_l']:.2f} | {s['cider']:.3f} | {r['train_seconds']} |")
    path.with_suffix(".md").write_text(
        "\n".join(lines) + "\n\n" + "\n".join(_mean_table(results)) + f"\n\n{precision_note(results)}.\n\nTest: first "
        f"{meta.get('limit')} E2E test MRs, greedy. {meta.get('steps')} optimizer steps of 10 pairs for both methods. Command: "
        f"`{meta.get('command')}`.\n")


def run_missing(results: dict, path: Path, jobs: list) -> None:
    """Run each (key, job) whose key is not in `results` yet; save the JSON after each, so a bench resumes."""
    for key, job in jobs:
        if key in results:
            continue
        results[key] = job()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(key, results[key]["scores"], flush=True)


def main() -> int:
    sizes = [int(x) for x in os.environ.get("SIZES", "50 200").split()]
    seeds = [int(x) for x in os.environ.get("SEEDS", "0").split()]
    steps, limit = int(os.environ.get("STEPS", "100")), int(os.environ.get("LIMIT", "100"))
    methods = os.environ.get("METHODS", " ".join(METHODS)).split()
    if unknown := set(methods) - set(METHODS):
        raise SystemExit(f"unknown METHODS {sorted(unknown)}; choose from {list(METHODS)}")
    path = RESULTS_DIR / ("lowdata.json" if (steps, limit) == (100, 100) else f"lowdata-steps{steps}-limit{limit}.json")
    results = json.loads(path.read_text()) if path.is_file() else {}
    env = " ".join(f"{k}={os.environ[k]!r}" for k in ("SIZES", "SEEDS", "STEPS", "LIMIT", "METHODS") if k in os.environ)
    meta = {"steps": steps, "limit": limit, "command": f"{env} python bench/lowdata.py".strip()}
    results["_meta"] = meta
    groups = load_groups("e2e", "test")[:limit]
    run_missing(results, path, [(f"{size}/{seed}/{method}", lambda size=size, seed=seed, method=method:
                                 METHODS[method](size, seed, steps, groups))
                                for size in sizes for seed in seeds for method in methods])
    write_table({k: v for k, v in results.items() if k != "_meta"}, meta, path)
    print(path.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
