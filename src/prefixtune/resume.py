"""Resume state of a training run: trainable parameters, AdamW moments and counters in one file.

One safetensors file (counters in its metadata) replaced atomically, so a run killed at any moment
leaves either the previous state or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

STATE_NAME = "resume_state.safetensors"


def save_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, counters: dict) -> None:
    """Write trainable parameters, optimizer state and `counters` (JSON-able) to run_dir."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    index = {id(p): n for n, p in params.items()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                t = value if torch.is_tensor(value) else torch.tensor(value)
                tensors[f"opt/{index[id(p)]}/{key}"] = t.detach().cpu().contiguous()
    tmp = run_dir / f".{STATE_NAME}.tmp{os.getpid()}"
    try:
        save_file(tensors, str(tmp), metadata={"counters": json.dumps(counters)})
        os.replace(tmp, run_dir / STATE_NAME)
    finally:
        tmp.unlink(missing_ok=True)


def has_state(run_dir: Path) -> bool:
    return (run_dir / STATE_NAME).is_file()


def load_state(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what `save_state` wrote; returns the counters. Refuses a state of another model shape."""
    path = run_dir / STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no resume state at {path}; start without --resume")
    with safe_open(str(path), framework="pt") as f:
        counters = json.loads(f.metadata()["counters"])
    tensors = load_file(str(path))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, p in params.items():
        saved = tensors.get(f"param/{name}")
        if saved is None or saved.shape != p.shape:
            raise ValueError(f"--resume: {path} does not match this run's prefix (parameter {name}); "
                             "resume with the same options, or start a new run directory")
        with torch.no_grad():
            p.copy_(saved.to(p.device))
    for p_name, p in params.items():
        # AdamW keeps its "step" counter on the CPU unless capturable; moments live with the parameter.
        state = {key.rsplit("/", 1)[1]: t if key.endswith("/step") else t.to(p.device)
                 for key, t in tensors.items() if key.startswith(f"opt/{p_name}/")}
        if state:
            optimizer.state[p] = state
    return counters
