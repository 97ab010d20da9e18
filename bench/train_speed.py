"""Training step time: prefixtune against PEFT's PrefixTuning on identical batches, measured in one run.

    python bench/train_speed.py                 # 10 rounds; ROUNDS=20 python bench/train_speed.py

Same model (SmolLM2-135M-Instruct), same length-grouped batches of 10 E2E pairs, an L=10 prefix with an MLP
reparametrisation (hidden 512) for both, AdamW, one full optimizer step (forward, backward, clip, step) per
timing. Each round runs one step of every variant in turn, so a busy neighbour slows all of them alike;
medians over rounds. Variants: prefixtune and PEFT in fp32 and under bf16 autocast (fp32 weights), and
prefixtune under bf16 autocast with its frozen linear layers stored in bf16 (`precision.store_frozen_linears`,
what `train` does once bf16 is chosen; bit-identical to autocast, without re-casting every frozen weight
in every op). PEFT is used as its users
do: `get_peft_model`, then `model(input_ids, attention_mask, labels=labels).loss`.
Writes bench/results/train_speed.json and .md.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from e2e_main import machine  # noqa: E402

from prefixtune import PrefixTuningModel, load_base_model, precision  # noqa: E402
from prefixtune.config import PrefixConfig, TextFormat  # noqa: E402
from prefixtune.data import batch_order, collate, encode, row_length, target_tokens  # noqa: E402
from prefixtune.tasks import load_groups, to_examples  # noqa: E402
from prefixtune.train import TargetLoss  # noqa: E402

OUT = ROOT / "bench" / "results"


def batches(tok, count: int) -> list[dict]:
    rows = encode(to_examples(load_groups("e2e", "train"))[:500], tok, TextFormat(), False)
    order = batch_order([row_length(r) for r in rows], 10, 0, 0, True)
    picked = [[rows[i] for i in order[k * 10 : (k + 1) * 10]] for k in range(count)]
    return [{**collate(b, tok.pad_token_id, False), "tokens": target_tokens(b, False)} for b in picked]


def ours(store_bf16: bool):
    base, tok = load_base_model()
    ptm = PrefixTuningModel(base, PrefixConfig(prefix_length=10), tok, TextFormat())
    loss_fn = TargetLoss(ptm)
    params = [p for p in ptm.parameters() if p.requires_grad]
    if store_bf16:
        precision.store_frozen_linears(base)

    def loss(batch):
        return loss_fn(batch["input_ids"], batch["attention_mask"], batch["labels"]) / batch["tokens"]

    return loss, params, tok


def peft_prefix():
    import peft

    base, tok = load_base_model()
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10, prefix_projection=True,
                                     encoder_hidden_size=512)
    model = peft.get_peft_model(base, config)
    model.train()

    def loss(batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    return loss, [p for p in model.parameters() if p.requires_grad], tok


def make_step(loss, params, bf16_autocast: bool):
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16_autocast else contextlib.nullcontext()

    def step(batch) -> float:
        start = time.perf_counter()
        with autocast:
            value = loss(batch)
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def main() -> int:
    rounds = int(os.environ.get("ROUNDS", "10"))
    torch.manual_seed(0)
    ours32, peft32, ours_stored = ours(False), peft_prefix(), ours(True)
    variants = {
        "prefixtune fp32": make_step(ours32[0], ours32[1], False),
        "PEFT fp32": make_step(peft32[0], peft32[1], False),
        "prefixtune bf16 autocast": make_step(ours32[0], ours32[1], True),
        "PEFT bf16 autocast": make_step(peft32[0], peft32[1], True),
        "prefixtune bf16 autocast, frozen linears stored bf16": make_step(ours_stored[0], ours_stored[1], True),
    }
    data = batches(ours32[2], rounds + 1)
    for step in variants.values():  # warm-up (kernel selection, allocator) on the spare batch
        step(data[-1])
    times = {name: [] for name in variants}
    for r in range(rounds):
        for name, step in variants.items():
            times[name].append(step(data[r]))
        print(f"[train_speed] round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()),
              flush=True)
    med = {name: statistics.median(t) for name, t in times.items()}
    ratios = {"fp32: PEFT / prefixtune": med["PEFT fp32"] / med["prefixtune fp32"],
              "bf16 autocast: PEFT / prefixtune": med["PEFT bf16 autocast"] / med["prefixtune bf16 autocast"],
              "bf16: PEFT autocast / prefixtune (stored bf16 linears, what train runs)":
                  med["PEFT bf16 autocast"] / med["prefixtune bf16 autocast, frozen linears stored bf16"],
              "prefixtune: autocast over fp32 weights / stored bf16 linears":
                  med["prefixtune bf16 autocast"] / med["prefixtune bf16 autocast, frozen linears stored bf16"]}
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in data[:rounds])
    report = {"rounds": rounds, "median_seconds": med, "ratios": ratios, "times": times,
              "tokens_per_batch": tokens, "machine": machine(), "torch_threads": torch.get_num_threads(),
              "command": f"ROUNDS={rounds} python bench/train_speed.py"}
    (OUT / "train_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| variant | median step s |", "|---|---:|"] + [f"| {n} | {s:.3f} |" for n, s in med.items()]
    lines += ["", "| ratio (higher: prefixtune faster) | value |", "|---|---:|"]
    lines += [f"| {n} | {v:.2f}x |" for n, v in ratios.items()]
    lines += ["", f"{rounds} rounds of identical batches of 10 E2E pairs (~{tokens:.0f} tokens), L=10 MLP prefix, "
              f"SmolLM2-135M-Instruct. Machine: {report['machine']}, {report['torch_threads']} torch threads. "
              f"Command: `{report['command']}`."]
    (OUT / "train_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
