"""Resume state of a training run: trainable parameters, AdamW moments, LR scheduler and counters in one file.

One safetensors file (counters, the run's options and a checksum of its tensors in its metadata) replaced
atomically, so a run killed at any moment leaves either the previous state or the new one, never a mix.
A state is checked completely before anything is taken from it: readable, its checksum, finite values,
well-formed counters, the same options as the resuming run, and shapes that fit the model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import artifact

STATE_NAME = "resume_state.safetensors"
#: counters every state holds, with the check their values must pass
_COUNTERS = {
    "step": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "best_dev": lambda v: v is None or (isinstance(v, (int, float)) and math.isfinite(v)),
    "bad_evals": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    "elapsed": lambda v: isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
}


class DamagedStateError(artifact.DamagedFileError):
    """A resume state that cannot be used: unreadable, corrupted, non-finite or malformed."""


@dataclass
class State:
    """A resume state read from disk and checked, not yet applied to a model."""

    path: Path
    tensors: dict[str, torch.Tensor]
    counters: dict
    scheduler: dict | None = None  # the LR scheduler's state_dict; None in states written before it was saved


def save_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, counters: dict,
               scheduler=None) -> None:
    """Write trainable parameters, optimizer state, `counters` (JSON-able) and the LR scheduler's state to run_dir.

    The prefix parameters and their optimizer state are whole on every process in every mode (DDP, FSDP2:
    see distributed.py), so the main process alone writes them.

    Refuses (NonFiniteError, the previous state kept) parameters or moments holding NaN or inf."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    index = {id(p): n for n, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"opt/{index[id(p)]}/{key}"] = t.detach().cpu().contiguous()
    target = run_dir / STATE_NAME
    artifact.require_finite(tensors, f"refusing to write {target}")
    tmp = artifact.temporary_file(target)
    try:
        metadata = {"counters": json.dumps(counters), "tensors_digest": artifact.tensors_digest(tensors)}
        if scheduler is not None:
            metadata["scheduler"] = json.dumps(scheduler.state_dict())
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    artifact.remove_stale(run_dir, (STATE_NAME,))


def has_state(run_dir: Path) -> bool:
    return (run_dir / STATE_NAME).is_file()


def _counters(path: Path, metadata: dict) -> dict:
    try:
        counters = json.loads(metadata["counters"])
    except (KeyError, json.JSONDecodeError):
        raise DamagedStateError(f"--resume: {path} has no readable counters in its metadata; "
                                "the file is damaged: start a new run directory") from None
    for key, valid in _COUNTERS.items():
        if not isinstance(counters, dict) or key not in counters or not valid(counters[key]):
            value = counters.get(key, "missing") if isinstance(counters, dict) else counters
            raise DamagedStateError(f"--resume: {path} has an invalid counter {key!r} ({value!r}); "
                                    "the file is damaged: start a new run directory")
    return counters


def _check_options(path: Path, saved: dict | None, options: dict) -> None:
    """Refuse to resume with options that make a different run; states written before options were recorded
    are not checked."""
    differing = [name for name in options if saved is not None and name in saved and saved[name] != options[name]]
    if differing:
        what = "; ".join(f"--{n.replace('_', '-')} was {saved[n]!r}, now {options[n]!r}" for n in differing)
        raise ValueError(f"--resume: {path} belongs to a run with other options ({what}): a resumed run must "
                         "replay the same run. Resume with the run's own values, or start a new --output")


def read_state(run_dir: Path, options: dict) -> State:
    """Read and check the state in run_dir against the resuming run's `options` (name -> value, as
    `save_state` got them in counters["options"]), before a model is loaded or touched."""
    path = run_dir / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no resume state at {path}; start without --resume")
    try:
        tensors, metadata = artifact.read_safetensors(path)
    except artifact.DamagedFileError as err:
        raise DamagedStateError(f"--resume: {err}; start a new run directory") from None
    counters = _counters(path, metadata)
    digest = metadata.get("tensors_digest")
    if digest is not None and digest != artifact.tensors_digest(tensors):
        raise DamagedStateError(f"--resume: {path} does not match its checksum (tensors_digest): its bytes are "
                                "corrupted; start a new run directory")
    try:
        artifact.require_finite(tensors, f"--resume: {path} is refused")
    except artifact.NonFiniteError as err:
        raise DamagedStateError(f"{err}; start a new run directory") from None
    _check_options(path, counters.get("options"), options)
    return State(path, tensors, counters, _scheduler(path, metadata, counters["step"]))


def _scheduler(path: Path, metadata: dict, step: int) -> dict | None:
    """The saved scheduler state, which must sit at the saved step (it is stepped once per optimizer step)."""
    if "scheduler" not in metadata:
        return None
    try:
        saved = json.loads(metadata["scheduler"])
    except json.JSONDecodeError:
        saved = None
    if not isinstance(saved, dict) or saved.get("last_epoch") != step:
        found = saved.get("last_epoch", "missing") if isinstance(saved, dict) else "unreadable"
        raise DamagedStateError(f"--resume: {path} has a scheduler state at step {found!r}, but its counters say "
                                f"step {step}; the file is damaged: start a new run directory")
    return saved


def apply_state(state: State, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> dict:
    """Restore a checked state into the model, optimizer and LR scheduler (a LambdaLR); returns its counters.
    Refuses a state of another model shape before changing anything."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    moments = {}
    for name, p in params.items():
        saved = state.tensors.get(f"param/{name}")
        mine = {key.rsplit("/", 1)[1]: t for key, t in state.tensors.items() if key.startswith(f"opt/{name}/")}
        wrong = [k for k, t in mine.items() if k != "step" and t.shape != p.shape]
        if saved is None or saved.shape != p.shape or wrong:
            raise ValueError(f"--resume: {state.path} does not match this run's prefix (parameter {name}"
                             f"{', optimizer state ' + wrong[0] if wrong else ''}); resume with the same options, "
                             "or start a new run directory")
        moments[name] = mine
    for name, p in params.items():
        with torch.no_grad():
            p.copy_(state.tensors[f"param/{name}"].to(p.device))
        # AdamW keeps its "step" counter on the CPU unless capturable; moments live with the parameter.
        if moments[name]:
            optimizer.state[p] = {k: t if k == "step" else t.to(p.device) for k, t in moments[name].items()}
    if scheduler is not None:
        _restore_scheduler(scheduler, state.scheduler, state.counters["step"])
    return state.counters


def _restore_scheduler(scheduler, saved: dict | None, step: int) -> None:
    """Load the scheduler's state (an older state without one: place it at `step`), then give the optimizer the
    learning rate of that step: LambdaLR.load_state_dict alone leaves the optimizer at the step-0 rate."""
    if saved is not None:
        scheduler.load_state_dict(saved)
    else:
        scheduler.last_epoch = step
        scheduler._last_lr = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
