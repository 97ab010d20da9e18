"""What a training run shows and leaves behind: progress bar, metrics.csv, loss_curve.png, summary, and
(`--report-to`) the same values in an experiment tracker through accelerate."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .checkpoint import WEIGHTS_NAME
from .extras import MissingExtra, needs

FIELDS = ["step", "epoch", "train_loss", "lr", "dev_loss", "elapsed_s"]
TRACKER_DIR = "trackers"  # under the run directory: where --report-to trackers write
PROJECT = "prefixtune"  # the trackers' project (TensorBoard: the folder below TRACKER_DIR; wandb: the project)


class RunLog:
    """Writes only on the main process; on resume, drops log rows past the resumed step."""

    def __init__(self, run_dir: Path, main: bool, resume_from: int | None = None, show_progress: bool = True,
                 tracker=None):
        self.dir, self.main, self.show_progress = Path(run_dir), main, show_progress
        self.tracker = tracker  # the Accelerator once start_trackers ran, else None
        self.csv = self.dir / "metrics.csv"
        if not main:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_from is not None and self.csv.is_file():
            with self.csv.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_from]
        with self.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def message(self, text: str) -> None:
        if self.main:
            tqdm.write(f"[prefixtune] {text}", file=sys.stderr)

    def header(self, cfg, note: str, ptm, bf16: bool, total: int) -> None:
        self.message(f"data: {note}")
        self.message(f"model: {cfg.model} ({ptm.base.config.model_type}, "
                     f"{sum(p.numel() for p in ptm.base.parameters()) / 1e6:.1f}M parameters, frozen, "
                     f"{_where(ptm.base)})")
        n = ptm.num_prefix_parameters()
        self.message(f"prefix: L={ptm.config.prefix_length}, {n:,} parameters ({n * 4 / 1e6:.2f} MB fp32) "
                     f"via {ptm.config.reparam}; training {sum(p.numel() for p in ptm.parameters() if p.requires_grad):,} "
                     f"parameters; lr {cfg.lr}, batch {cfg.batch_size}, {total} steps, bf16 autocast {'on' if bf16 else 'off'}"
                     + (", gradient checkpointing" if getattr(cfg, "gradient_checkpointing", False) else ""))

    def progress(self, total: int, initial: int):
        return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not (self.main and self.show_progress),
                    dynamic_ncols=True, file=sys.stderr)

    def step(self, step: int, epoch: int, loss: float, lr: float, dev: float | None, elapsed: float, bar) -> None:
        if not self.main:
            return
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", **({"dev": f"{dev:.3f}"} if dev is not None else {}))
        with self.csv.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({"step": step, "epoch": epoch, "train_loss": f"{loss:.5f}",
                                                "lr": f"{lr:.3e}", "dev_loss": "" if dev is None else f"{dev:.5f}",
                                                "elapsed_s": f"{elapsed:.1f}"})
        if self.tracker is not None:  # the unrounded values the CSV rounds
            values = {"train_loss": loss, "lr": lr, **({"dev_loss": dev} if dev is not None else {})}
            self.tracker.log(values, step=step)

    def finish(self, counters: dict, note: str, ptm) -> dict:
        weights = self.dir / WEIGHTS_NAME
        summary = {"steps": counters["step"], "best_dev_loss": counters["best_dev"],
                   "train_seconds": round(counters["elapsed"], 1), "data": note,
                   "bf16": counters.get("bf16"), "base": _where(ptm.base), "prefix_parameters": ptm.num_prefix_parameters(),
                   "prefix_bytes": weights.stat().st_size if weights.is_file() else None}
        if self.main:
            (self.dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            if self.tracker is not None:
                numbers = {f"summary/{k}": v for k, v in summary.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}
                self.tracker.log(numbers, step=summary["steps"])
            try:
                self.plot()
            except MissingExtra as err:  # the plot is a by-product: a finished run must not fail over it
                self.message(f"no loss_curve.png: {err}")
            self.message(f"done: {summary['steps']} steps in {summary['train_seconds']} s, best dev loss "
                         f"{summary['best_dev_loss']:.4f}; prefix saved in {self.dir} ({summary['prefix_bytes']} bytes)")
        return summary

    def plot(self) -> None:
        """loss_curve.png: training loss per step and dev loss at each evaluation."""
        with needs("plots"):
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

        with self.csv.open() as f:
            rows = list(csv.DictReader(f))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([int(r["step"]) for r in rows], [float(r["train_loss"]) for r in rows], label="train", lw=1)
        dev = [(int(r["step"]), float(r["dev_loss"])) for r in rows if r["dev_loss"]]
        if dev:
            ax.plot(*zip(*dev), "o-", label="dev")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("target-token cross-entropy")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.dir / "loss_curve.png", dpi=100)
        plt.close(fig)


def start_trackers(acc, cfg, resume_from: int | None) -> bool:
    """Start accelerate's tracker for `cfg.report_to` (on every process; only the main one writes), writing
    under OUTPUT/trackers/; False for "none". The Accelerator exists before the run's options reach it
    (distributed.make_accelerator), so this sets what Accelerator(log_with=, project_dir=) would."""
    if cfg.report_to == "none":
        return False
    from accelerate.tracking import filter_trackers

    where = Path(cfg.output) / TRACKER_DIR
    if acc.is_main_process:
        where.mkdir(parents=True, exist_ok=True)
    acc.project_configuration.project_dir = acc.project_configuration.logging_dir = str(where)
    acc.log_with = filter_trackers([cfg.report_to], str(where))
    name = Path(cfg.output).resolve().name
    init = {"tensorboard": {"purge_step": resume_from + 1} if resume_from else {},  # drop what the resume redoes
            "wandb": {"dir": str(where), "name": name}, "mlflow": {"run_name": name}}[cfg.report_to]
    if cfg.report_to == "mlflow" and "MLFLOW_TRACKING_URI" not in os.environ:
        import mlflow

        mlflow.set_tracking_uri((where / "mlruns").resolve().as_uri())  # not ./mlruns of whatever cwd
    acc.init_trackers(PROJECT, config=_flat_options(cfg), init_kwargs={cfg.report_to: init})
    return True


def _flat_options(cfg) -> dict:
    """The run's options as trackers take hyperparameters: flat, scalars only (None left out)."""
    flat = {}
    for key, value in dataclasses.asdict(cfg).items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            if isinstance(v, (bool, int, float, str)):
                flat[f"{key}.{sub}" if sub else key] = v
    return flat


def _where(base) -> str:
    """"float32 on cpu": the frozen base's weight dtype and device (--dtype, --device) as this run holds them."""
    weight = next(base.parameters())  # the embedding: what --dtype set (bf16-stored linears leave it fp32)
    return f"{str(weight.dtype).removeprefix('torch.')} on {weight.device}"
