"""The methods bench/reproduce.py compares, all through the same data, loss, schedule and evaluation.

Prefix-tuning and its ablations train through prefixtune's own `train` (which resumes after a kill).
Every baseline trains through `train_baseline` below, a loop that mirrors prefixtune's: the same
examples (`prefixtune.train.load_training_data`), the same text format and token encoding, the same
length-grouped batch order (`data.batch_order`), the same loss (summed cross-entropy over target tokens
divided by the batch's target-token count), the same warm-up/linear-decay schedule (`train.lr_at`),
gradient clipping, keep-the-best-on-dev-loss rule and bf16 choice. Only what is trained differs:
- finetune: every weight;   ft-top2: the top two transformer blocks (the paper's FT-top2);
- lora-matched: LoRA (PEFT) on q_proj/v_proj with the rank whose parameter count is closest to the saved
  prefix's (rank 2 on SmolLM2-135M: 115,200 = the L=10 prefix); lora-r8: the same at rank 8;
- peft-prefix: PEFT's own PrefixTuning (MLP projection, hidden 512): the same method, another
  implementation; it is decoded with prefixtune's engine after import (`peft_import`), so the
  decoding is identical and only training differs.
Evaluation: every method is decoded by `MultiPrefixModel.generate` with the same GenerateConfig.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import torch

from prefixtune import GenerateConfig, MultiPrefixModel, load_base_model, precision, resume
from prefixtune.config import PrefixConfig, TextFormat, TrainConfig
from prefixtune.data import batch_order, collate, encode, row_length, summed_loss, target_tokens
from prefixtune.peft_import import load_peft_prefix
from prefixtune.tasks import SourceGroup
from prefixtune.train import load_training_data, lr_at, train

PREFIX_METHODS = ("prefix", "prompt")  # trained by prefixtune's own train()
BASELINES = ("finetune", "ft-top2", "lora-matched", "lora-r8", "peft-prefix")
SAVE_EVERY = 50  # baseline resume-state interval, in optimizer steps


def train_config(spec, out: Path) -> TrainConfig:
    """The TrainConfig a run spec means (baselines read its data, schedule and batch settings too)."""
    prefix = PrefixConfig(prefix_length=spec.prefix_length, init_text=spec.init_text,
                          reparam="embedding" if spec.method == "prompt" else spec.reparam, variant=spec.variant)
    return TrainConfig(task=spec.task, train_size=spec.train_size, seed=spec.seed, output=str(out), prefix=prefix,
                       lr=spec.lr, batch_size=10, epochs=10**6, max_steps=spec.steps,
                       warmup_steps=spec.steps // 10, eval_every=max(1, spec.steps // 10), resume_every=25,
                       progress=False, bf16="auto")


def train_prefix(spec, out: Path) -> tuple[MultiPrefixModel, dict]:
    """prefixtune's train() (resuming a killed run); returns the base with the best prefix loaded as "run"."""
    cfg = train_config(spec, out)
    summary_file = out / "train_summary.json"
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    else:
        summary = train(replace(cfg, resume=resume.has_state(out)))
    base, tok = load_base_model()
    multi = MultiPrefixModel(base, tok)
    multi.add("run", out)
    return multi, {"train_seconds": summary["train_seconds"], "trained_parameters": summary["prefix_parameters"],
                   "best_dev_loss": summary.get("best_dev_loss")}


def _top_blocks(base, count: int) -> list[torch.nn.Parameter]:
    """Parameters of the last `count` blocks of the model's longest ModuleList (its transformer layers)."""
    blocks = max((m for m in base.modules() if isinstance(m, torch.nn.ModuleList)), key=len)
    return [p for block in blocks[-count:] for p in block.parameters()]


def _lora_rank(spec, base) -> int:
    """Rank 8, or (lora-matched) the rank whose q/v LoRA size is closest to the saved prefix's size."""
    if spec.method == "lora-r8":
        return 8
    cfg = base.config
    kv_dim = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    prefix_size = spec.prefix_length * cfg.num_hidden_layers * 2 * kv_dim
    per_rank = cfg.num_hidden_layers * (2 * cfg.hidden_size + cfg.hidden_size + kv_dim)  # q: d->d, v: d->kv
    return max(1, round(prefix_size / per_rank))


def build_baseline(spec, base):
    """(module to train, its trainable parameters, facts) for a baseline method."""
    for p in base.parameters():
        p.requires_grad_(spec.method == "finetune")
    if spec.method == "finetune":
        return base, list(base.parameters()), {}
    if spec.method == "ft-top2":
        params = _top_blocks(base, 2)
        for p in params:
            p.requires_grad_(True)
        return base, params, {}
    import peft

    if spec.method.startswith("lora"):
        rank = _lora_rank(spec, base)
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                 task_type="CAUSAL_LM")
        facts = {"lora_rank": rank}
    elif spec.method == "peft-prefix":
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=spec.prefix_length,
                                         prefix_projection=True, encoder_hidden_size=512)
        facts = {}
    else:
        raise ValueError(f"unknown baseline {spec.method!r}; known: {BASELINES}")
    model = peft.get_peft_model(base, config)
    return model, [p for p in model.parameters() if p.requires_grad], facts


def _loss(model, rows, pad_id) -> torch.Tensor:
    """Summed target-token cross-entropy of `rows` (the loss prefixtune trains with, decoder-only)."""
    batch = collate(rows, pad_id, False)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return summed_loss(logits, batch["labels"], shift=True)


def _dev_loss(model, rows, pad_id, autocast) -> float:
    rows = sorted(rows, key=row_length)
    total = 0.0
    with torch.no_grad(), autocast:
        for i in range(0, len(rows), 10):
            total += float(_loss(model, rows[i : i + 10], pad_id))
    return total / max(1, target_tokens(rows, False))


def _trainable_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train_baseline(spec, out: Path) -> tuple[MultiPrefixModel, dict]:
    """Train a baseline (resuming from out/state.pt), restore its best-on-dev weights, return it ready to decode."""
    cfg = train_config(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(spec.seed)
    base, tok = load_base_model()
    train_ex, dev_ex, _ = load_training_data(cfg)
    fmt = TextFormat()
    rows = encode(train_ex, tok, fmt, False, cfg.max_source_tokens, cfg.max_target_tokens)
    dev_rows = encode(dev_ex, tok, fmt, False, cfg.max_source_tokens, cfg.max_target_tokens)
    model, params, facts = build_baseline(spec, base)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    per_epoch = len(rows) // cfg.batch_size
    total = min(cfg.max_steps, per_epoch * cfg.epochs)
    state_file = out / "state.pt"
    c = {"step": 0, "best_dev": math.inf, "best": None, "elapsed": 0.0}
    if state_file.is_file():
        saved = torch.load(state_file, weights_only=True)
        model.load_state_dict(saved["model"], strict=False)
        optimizer.load_state_dict(saved["optimizer"])
        c = saved["counters"]
    bf16 = precision.bf16_wanted("auto", torch.device("cpu"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    model.train()
    lengths, started = [row_length(r) for r in rows], time.time() - c["elapsed"]
    while c["step"] < total:
        epoch, index = divmod(c["step"], per_epoch)
        order = batch_order(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
        batch = [rows[i] for i in order[index * cfg.batch_size : (index + 1) * cfg.batch_size]]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(c["step"], cfg, total)
        with autocast:
            loss = _loss(model, batch, tok.pad_token_id)
        (loss / max(1, target_tokens(batch, False))).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        c["step"], c["elapsed"] = c["step"] + 1, time.time() - started
        if c["step"] % cfg.eval_every == 0 or c["step"] == total:
            model.eval()
            dev = _dev_loss(model, dev_rows, tok.pad_token_id, autocast)
            model.train()
            if dev < c["best_dev"]:
                c["best_dev"], c["best"] = dev, _trainable_state(model)
        if c["step"] % SAVE_EVERY == 0 and c["step"] < total:
            _save(state_file, {"model": _trainable_state(model), "optimizer": optimizer.state_dict(), "counters": c})
    model.load_state_dict(c["best"], strict=False)
    model.eval()
    facts.update(train_seconds=round(c["elapsed"], 1), trained_parameters=sum(p.numel() for p in params),
                 best_dev_loss=round(c["best_dev"], 5))
    multi = _decoder(spec, model, base, tok, out)
    state_file.unlink(missing_ok=True)
    return multi, facts


def _decoder(spec, model, base, tok, out: Path) -> MultiPrefixModel:
    """The trained baseline as a MultiPrefixModel: LoRA merged into the base; PEFT's prefix imported as "run"."""
    if spec.method == "peft-prefix":
        model.save_pretrained(out / "peft")
        plain = model.get_base_model()
        multi = MultiPrefixModel(plain, tok)
        multi.add("run", load_peft_prefix(out / "peft", plain, multi.shapes))
        return multi
    if spec.method.startswith("lora"):
        model = model.merge_and_unload()
    return MultiPrefixModel(model, tok)


def decode(multi: MultiPrefixModel, groups: list[SourceGroup], config: GenerateConfig, partial: Path,
           chunk: int = 64) -> tuple[list[str], float]:
    """Predictions for `groups` in chunks, each appended to `partial` (JSON lines) so a kill loses one chunk."""
    name = "run" if "run" in multi.tasks() else None
    done = [json.loads(line) for line in partial.read_text().splitlines()] if partial.is_file() else []
    seconds = sum(d["seconds"] for d in done)
    preds = [p for d in done for p in d["predictions"]]
    while len(preds) < len(groups):
        part = groups[len(preds) : len(preds) + chunk]
        start = time.time()
        out = multi.generate([g.source for g in part], [name] * len(part), config)
        record = {"predictions": out, "seconds": round(time.time() - start, 2)}
        with partial.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        preds, seconds = preds + out, seconds + record["seconds"]
    return preds, round(seconds, 1)


def run_method(spec, out: Path) -> tuple[MultiPrefixModel, dict]:
    """Train (or resume) the run's method; the trained model ready for `decode`."""
    if spec.method in PREFIX_METHODS:
        return train_prefix(spec, out)
    return train_baseline(spec, out)
