"""train(cfg): freeze the base model, optimise the prefix, keep the best on dev, resume after a kill.

Loss: summed cross-entropy of target tokens divided by the number of target tokens of the whole
global batch, so one process, several processes (accelerate/DDP) or several accumulation steps all
compute the same gradient for the same global batch.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from . import _compat, base_model, distributed, extras, precision, resume
from .config import TextFormat, TrainConfig, bf16_mode
from .data import Encoded, batch_order, collate, encode, row_length, summed_loss, target_tokens
from .model import PrefixTuningModel
from .runlog import RunLog, start_trackers
from .tasks import get_task, load_groups, low_data_split, to_examples


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill options left as None from the task's recipe (``TaskSpec.train_defaults``, the low-data one when
    ``train_size`` is set); validate the rest, the prefix included, before any model or data is loaded."""
    recipe = get_task(cfg.task).train_defaults(low_data=bool(cfg.train_size))
    filled = {name: getattr(recipe, name) for name in ("lr", "epochs", "batch_size") if getattr(cfg, name) is None}
    length = recipe.prefix_length if cfg.prefix.prefix_length is None else cfg.prefix.prefix_length
    prefix = dataclasses.replace(cfg.prefix, prefix_length=length, seed=cfg.seed).validate()
    cfg = dataclasses.replace(cfg, prefix=prefix, **filled).validate()
    cfg.bf16 = bf16_mode(cfg.bf16)
    return cfg


#: options whose change makes a resumed run a different run: `--resume` refuses them (resume.read_state)
RUN_OPTIONS = ("task", "train_size", "seed", "lr", "batch_size", "grad_accum", "warmup_steps", "weight_decay")


def run_options(cfg: TrainConfig) -> dict:
    return {name: getattr(cfg, name) for name in RUN_OPTIONS}


def check_output(path: Path) -> None:
    """Refuse an --output that cannot become the run directory, before any model or data is loaded (and
    without creating it: a refused run leaves nothing behind)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {path} is an existing file; give a directory (it is created if missing)")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--output {path} cannot be created: {existing} is a file, not a directory")
    try:  # os.access is no proof (root passes it, read-only mounts need not fail it): try it
        tempfile.TemporaryDirectory(prefix=".prefixtune-probe-", dir=existing).cleanup()
    except OSError as err:
        raise ValueError(f"--output {path} is not writable: cannot create files in {existing} "
                         f"({err.strerror or err}); choose another directory") from None


def load_training_data(cfg: TrainConfig):
    """(train examples, dev examples, a note saying which data was used)."""
    spec = get_task(cfg.task)
    train_split = "train"
    pool = load_groups(cfg.task, train_split, cfg.data_dir, path=cfg.train_file)
    if not pool:
        where = cfg.train_file or f"{cfg.task}/{train_split}"
        raise ValueError(f"{where} holds no training pairs (the file is empty or has only blank lines)")
    if cfg.train_size:
        train, dev = low_data_split(pool, cfg.train_size, cfg.seed)
        note = f"{len(train)} training and {len(dev)} dev pairs drawn with seed {cfg.seed} from {cfg.task}/{train_split}"
    elif cfg.dev_file or (cfg.train_file is None and "dev" in spec.splits):
        train = to_examples(pool)
        dev = to_examples(load_groups(cfg.task, "dev", cfg.data_dir, path=cfg.dev_file))
        note = f"{len(train)} training pairs ({cfg.task}/{train_split}), {len(dev)} dev pairs"
    else:  # no dev split: hold out 5% of the sources (at least one), chosen with the seed
        order = list(range(len(pool)))
        random.Random(cfg.seed).shuffle(order)
        n_dev = max(1, round(0.05 * len(pool)))
        dev = to_examples([pool[i] for i in sorted(order[:n_dev])])
        train = to_examples([pool[i] for i in sorted(order[n_dev:])])
        note = f"{len(train)} training pairs from {cfg.task}/{train_split}; {len(dev)} dev pairs held out of it"
    if spec.note:
        note += ". " + spec.note
    return train, dev, note


class NonFiniteTrainingError(ValueError):
    """Training diverged (NaN/inf loss, gradients or parameters); what was saved before is kept."""


class TargetLoss(nn.Module):
    """forward(batch) -> summed target-token cross-entropy; the module DDP wraps."""

    def __init__(self, ptm: PrefixTuningModel):
        super().__init__()
        self.ptm = ptm
        self.encoder_decoder = _compat.is_encoder_decoder(ptm.base)

    def forward(self, input_ids, attention_mask, labels):
        if self.encoder_decoder:
            logits = self.ptm(input_ids, attention_mask, labels=labels).logits
            return summed_loss(logits, labels, shift=False)
        backbone, head = _compat.backbone_and_head(self.ptm.base)
        boundary = (labels != -100).int().argmax(1) - 1  # the separator: last source token
        hidden = self.ptm.run(backbone, input_ids, attention_mask, infix_boundary=boundary).last_hidden_state
        keep = labels[:, 1:] != -100  # logits only where a target token is predicted
        logits = head(hidden[:, :-1][keep])
        return summed_loss(logits[None], labels[:, 1:][keep][None], shift=False)


def schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """`lr_at` as a LambdaLR (a factor of cfg.lr), so that accelerate prepares it and resume restores it."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, total) / cfg.lr)


def _autocast(cfg: TrainConfig, acc, counters: dict, workload: precision.Workload):
    """bf16 autocast or not: with "auto", a resumed run's recorded choice (re-measuring must not change a run
    half-way), else the measured one (`workload` is the run's own training step, see precision.py); every
    process takes the main process's answer. "on"/"off" are taken as given."""
    from accelerate.utils import broadcast_object_list

    wanted = counters.get("bf16") if cfg.bf16 == "auto" else cfg.bf16 == "on"
    if wanted is None:
        wanted = precision.bf16_wanted(cfg.bf16, acc.device, workload) if acc.is_main_process else None
        if acc.num_processes > 1:
            wanted = broadcast_object_list([wanted])[0]
    counters["bf16"] = bool(wanted)
    return torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=wanted), wanted


def _train_workload(rows: list[Encoded], cfg: TrainConfig, device, pad_id: int, ptm) -> precision.Workload:
    """One real training step (forward and backward of the first batch of epoch 0, on this process's model
    without DDP, so timing it needs no other process), gradients dropped after: what `--bf16 auto` times."""
    loss_fn, enc_dec = TargetLoss(ptm), _compat.is_encoder_decoder(ptm.base)
    order = batch_order([row_length(r) for r in rows], cfg.batch_size, cfg.seed, 0, cfg.group_by_length)
    batch = [rows[i] for i in order[: cfg.batch_size]]
    tensors = {k: v.to(device) for k, v in collate(batch, pad_id, enc_dec).items()}

    def step() -> None:
        loss_fn(**tensors).backward()
        for p in ptm.parameters():
            p.grad = None

    tokens = precision.shape_bucket(max(row_length(r) for r in batch))
    key = f"train {precision.model_key(ptm.base)} L{cfg.prefix.prefix_length} {cfg.prefix.reparam} b{cfg.batch_size} t{tokens}"
    return precision.Workload(key, step)


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Linear warm-up to cfg.lr, then linear decay to 0 at `total` steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr * max(0.0, (total - step) / max(1, total - cfg.warmup_steps))


def dev_loss(loss_fn: TargetLoss, rows: list[Encoded], cfg: TrainConfig, pad_id: int, autocast,
             model: nn.Module | None = None) -> float:
    """Token-mean cross-entropy on the dev pairs; through `model` (the prepared loss_fn) when given: under FSDP
    the sharded base runs only through its root module, on every process."""
    model = model or loss_fn
    total, count = 0.0, target_tokens(rows, loss_fn.encoder_decoder)
    device = next(loss_fn.ptm.base.parameters()).device
    rows = sorted(rows, key=row_length)  # less padding; the sum is the same
    with torch.no_grad(), autocast:
        for i in range(0, len(rows), cfg.batch_size):
            batch = collate(rows[i : i + cfg.batch_size], pad_id, loss_fn.encoder_decoder)
            total += float(model(**{k: v.to(device) for k, v in batch.items()}))
    return total / max(1, count)


def _step(model, rows, cfg, acc, pad_id, encoder_decoder, autocast) -> float:
    """One optimizer step's forward/backward over the global batch `rows`; returns its mean loss."""
    n_tokens = max(1, target_tokens(rows, encoder_decoder))
    micro = cfg.batch_size // cfg.grad_accum
    summed = torch.zeros((), device=acc.device)
    for start in range(0, len(rows), micro):
        mine = rows[start : start + micro][acc.process_index :: acc.num_processes]
        batch = {k: v.to(acc.device) for k, v in collate(mine, pad_id, encoder_decoder).items()}
        with autocast:
            loss = model(**batch)
        # DDP (and distributed.average_replicated_grads under FSDP) average gradients over processes: scale so
        # that the result is sum / global token count.
        acc.backward(loss * acc.num_processes / n_tokens)
        summed += loss.detach()
    return float(acc.reduce(summed, reduction="sum")) / n_tokens


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the summary also written to train_summary.json."""
    cfg = resolve(cfg)
    out = Path(cfg.output)
    check_output(out)
    extras.require_tracker(cfg.report_to)  # one line now, not a warning from accelerate after loading
    if cfg.resume and not resume.has_state(out):
        raise FileNotFoundError(f"--resume: {out} holds no resume state; start without --resume")
    state = resume.read_state(out, run_options(cfg)) if cfg.resume else None
    train_ex, dev_ex, note = load_training_data(cfg)
    acc = distributed.make_accelerator(cfg.device)
    if distributed.is_fsdp(acc) and cfg.prefix.reparam == "embedding":
        raise ValueError("--reparam embedding runs the frozen base twice in every forward (once to compute the "
                         "prefix), which FSDP2's resharding cannot back-propagate through; train this ablation "
                         "with DDP (configs/accelerate/ddp.yaml) or on one process")
    base, tokenizer = base_model.load(cfg, device=acc.device)  # the launcher's device for this process
    # A copy: the model rewrites its config (L from init_text, reparam "table" once the MLP is dropped).
    ptm = PrefixTuningModel(base, dataclasses.replace(cfg.prefix), tokenizer, TextFormat())
    if cfg.gradient_checkpointing:
        ptm.enable_gradient_checkpointing()
        base.train()  # transformers checkpoints only modules in training mode
    enc_dec = _compat.is_encoder_decoder(base)
    train_rows = encode(train_ex, tokenizer, ptm.text_format, enc_dec, cfg.max_source_tokens, cfg.max_target_tokens)
    dev_rows = encode(dev_ex, tokenizer, ptm.text_format, enc_dec, cfg.max_source_tokens, cfg.max_target_tokens)
    if len(train_rows) < cfg.batch_size:
        raise ValueError(f"{len(train_rows)} training pairs cannot fill one batch of {cfg.batch_size}; lower --batch-size")
    steps_per_epoch = len(train_rows) // cfg.batch_size
    total = min(cfg.max_steps or math.inf, steps_per_epoch * cfg.epochs)
    # The prefix modules are built on the CPU; prepare moves them for DDP, but FSDP leaves its ignored
    # (replicated) parameters where they are.
    ptm.to(acc.device)
    trainable = [p for p in ptm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = schedule(optimizer, cfg, int(total))
    counters = {"step": 0, "best_dev": None, "bad_evals": 0, "elapsed": 0.0, "nonfinite_steps": 0,
                "options": run_options(cfg)}
    if state is not None:
        counters = {**counters, **resume.apply_state(state, ptm, optimizer, scheduler)}
    # Timed before prepare: under FSDP the base is whole only until then, and only the main process times it.
    workload = _train_workload(train_rows, cfg, acc.device, tokenizer.pad_token_id, ptm)
    autocast, bf16 = _autocast(cfg, acc, counters, workload)
    if bf16 and not distributed.is_fsdp(acc):  # every forward from here on runs under this autocast
        precision.store_frozen_linears(base)
    distributed.configure_fsdp(acc, base, trainable)
    model, optimizer, scheduler = acc.prepare(TargetLoss(ptm), optimizer, scheduler)
    resumed = counters["step"] if cfg.resume else None
    tracking = start_trackers(acc, cfg, resumed)
    log = RunLog(out, acc.is_main_process, resumed, cfg.progress, tracker=acc if tracking else None)
    log.header(cfg, note, ptm, bf16, total)
    log.message(distributed.describe(acc, model, base))
    loop = _Loop(cfg, acc, model, ptm, optimizer, scheduler, counters, log, train_rows, dev_rows,
                 tokenizer.pad_token_id, autocast, int(total), steps_per_epoch, note)
    try:
        return loop.run()
    finally:
        if tracking:  # flushes and closes the tracker's run, also when training stopped with an error
            acc.end_training()


@dataclasses.dataclass
class _Loop:
    """The optimisation loop's state, split out of `train` to keep each part short."""

    cfg: TrainConfig
    acc: object  # accelerate.Accelerator
    model: nn.Module  # TargetLoss as accelerate prepared it: itself, DDP-wrapped, or fully_shard-ed (FSDP2)
    ptm: PrefixTuningModel
    optimizer: torch.optim.Optimizer  # accelerate's wrapper over AdamW
    scheduler: object  # accelerate's wrapper over `schedule` (LambdaLR of lr_at)
    counters: dict  # step, best_dev, bad_evals, elapsed, nonfinite_steps, options, bf16: what a resume restores
    log: RunLog
    train_rows: list[Encoded]
    dev_rows: list[Encoded]
    pad_id: int
    autocast: object
    total: int
    steps_per_epoch: int
    note: str

    def __post_init__(self) -> None:
        self.enc_dec = _compat.is_encoder_decoder(self.ptm.base)
        self.loss_fn = TargetLoss(self.ptm)
        self.fsdp = distributed.is_fsdp(self.acc)
        self.eval_every = self.cfg.eval_every or self.steps_per_epoch
        self.lengths = [row_length(r) for r in self.train_rows]
        self.train_loss: float | None = None  # the last step's, for the model card

    def run(self) -> dict:
        c, cfg = self.counters, self.cfg
        started = time.time() - c["elapsed"]
        params = [p for p in self.ptm.parameters() if p.requires_grad]
        bar = self.log.progress(self.total, c["step"])
        while c["step"] < self.total:
            step = c["step"]
            epoch, index = divmod(step, self.steps_per_epoch)
            order = batch_order(self.lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
            rows = [self.train_rows[i] for i in order[index * cfg.batch_size : (index + 1) * cfg.batch_size]]
            lr = self.scheduler.get_last_lr()[0]  # lr_at(step)
            loss = _step(self.model, rows, cfg, self.acc, self.pad_id, self.enc_dec, self.autocast)
            distributed.average_replicated_grads(self.acc, params)
            self._update(params, loss, step + 1, lr)
            self.scheduler.step()  # skipped updates too: the schedule follows the step count, as lr_at does
            c["step"], c["elapsed"], self.train_loss = step + 1, time.time() - started, loss
            dev = self._maybe_evaluate()
            self.log.step(c["step"], epoch + 1, loss, lr, dev, c["elapsed"], bar)
            # not inside a run of skipped steps: a resume state never moves into a divergence
            due = c["step"] % cfg.resume_every == 0 or c["step"] == self.total or self._stop()
            if due and not c["nonfinite_steps"]:
                self._checkpoint()
            if self._stop():
                self.log.message(f"early stopping: {c['bad_evals']} evaluations without dev improvement")
                break
        bar.close()
        if c["best_dev"] is None:
            raise NonFiniteTrainingError(f"training ended without a finite dev loss: no prefix was saved in "
                                         f"{cfg.output}; check the dev data and lower --lr")
        return self.log.finish(c, self.note, self.ptm)

    def _update(self, params: list, loss: float, step: int, lr: float) -> None:
        """The optimizer step, or, when the loss or gradient norm is NaN/inf, no update at all (its batch
        is skipped); more than max_nonfinite_steps skipped in a row, or an update that makes the
        parameters non-finite, stops training before anything non-finite can be saved."""
        c, cfg = self.counters, self.cfg
        norm = self.acc.clip_grad_norm_(params, cfg.max_grad_norm)
        norm = 0.0 if norm is None else float(norm)  # None: DeepSpeed clips (and checks overflow) itself
        # every process decides together: one skipping while another steps would diverge or deadlock
        finite = distributed.all_true(self.acc, math.isfinite(loss) and math.isfinite(norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        c["nonfinite_steps"] = 0 if finite else c.get("nonfinite_steps", 0) + 1
        if c["nonfinite_steps"] > cfg.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"training stopped at step {step}: loss or gradient was NaN/inf for {c['nonfinite_steps']} steps in "
                f"a row (--max-nonfinite-steps {cfg.max_nonfinite_steps}; loss {loss}, lr {lr:.3g}); {self._kept()}. "
                "Lower --lr, or check the training data")
        if not finite:
            self.log.message(f"step {step}: loss {loss}, gradient norm {norm}: update skipped "
                             f"({c['nonfinite_steps']} of at most {cfg.max_nonfinite_steps} in a row)")
        elif not distributed.all_true(self.acc, all(bool(torch.isfinite(p).all()) for p in params)):
            raise NonFiniteTrainingError(f"training stopped at step {step}: the update made the prefix parameters "
                                         f"NaN/inf (lr {lr:.3g} is too high); {self._kept()}. Lower --lr")

    def _kept(self) -> str:
        """What a stopped run leaves: only what was saved while everything was finite."""
        best, out = self.counters["best_dev"], self.cfg.output
        if best is None:
            return f"no prefix was saved in {out}"
        return f"the best prefix so far (dev loss {best:.4f}) in {out} is kept"

    def _stop(self) -> bool:
        return self.cfg.patience is not None and self.counters["bad_evals"] >= self.cfg.patience

    def _maybe_evaluate(self) -> float | None:
        c = self.counters
        if c["step"] % self.eval_every and c["step"] != self.total:
            return None
        loss = dev_loss(self.loss_fn, self.dev_rows, self.cfg, self.pad_id, self.autocast,
                        self.model if self.fsdp else None)
        if not math.isfinite(loss):  # never the best: a NaN/inf prefix is never saved
            self.log.message(f"step {c['step']}: dev loss {loss}; the prefix is not saved")
            c["bad_evals"] += 1
        elif c["best_dev"] is None or loss < c["best_dev"]:
            c["best_dev"], c["bad_evals"] = loss, 0
            if self.acc.is_main_process:  # the prefix parameters are whole on every process, FSDP included
                self.ptm.save_pretrained(self.cfg.output, extra={"training": self._facts(loss)}, card=self._card(loss))
        else:
            c["bad_evals"] += 1
        return loss

    def _facts(self, loss: float) -> dict:
        cfg = self.cfg
        return {"task": cfg.task, "model": cfg.model, "step": self.counters["step"], "dev_loss": round(loss, 5),
                "train_size": cfg.train_size, "seed": cfg.seed, "data": self.note}

    def _card(self, loss: float) -> dict:
        """The model card's facts (modelcard.CardFacts) of the prefix saved at this step."""
        return {"base_model": self.cfg.model, "task": self.cfg.task, "train_pairs": len(self.train_rows),
                "dev_pairs": len(self.dev_rows), "data": self.note, "steps": self.counters["step"],
                "total_steps": self.total, "train_loss": self.train_loss, "dev_loss": loss}

    def _checkpoint(self) -> None:
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            resume.save_state(Path(self.cfg.output), self.ptm, self.optimizer, self.counters, self.scheduler)
