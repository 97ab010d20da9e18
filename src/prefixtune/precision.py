"""Whether bf16 autocast pays off for a piece of work: the one place that resolves `bf16="auto"`.

Why it measures instead of reading CPU flags: the flags do not tell. Without AVX512_BF16 or AMX, oneDNN
still calls bf16 "supported" on AVX-512 CPUs and emulates it, much slower than fp32, so such CPUs get
fp32 without measuring. With AVX512_BF16 it can still lose: on some CPUs bf16 autocast is slower than
fp32 for training or beam decoding, on others clearly faster (README; bench/precision_check.py measures it).

Why it times the real work: a small matmul's ratio is not a training step's (autocast also re-casts every
frozen weight per op, and attention, softmax and the loss stay fp32). So the caller hands over a
`Workload`: one real step (a training step on the first batch, a decoding step of the real batch) and a
key naming its shape. Both precisions are timed alternately, several rounds after a warm-up each, and
the decision is taken on the median ratio with a margin (`MIN_SPEEDUP`).

Why an answer is not kept forever: a probe taken while other work runs can be wrong. A decision is kept
in the cache folder (so that later processes agree without measuring) only when it was *clear*: every
round's ratio on the same side of the margin and each precision's own timings steady. A noisy
measurement decides for this process only; an answer older than `MAX_AGE_S`, or taken on another
machine/torch/thread count, is measured again. A resumed training run reuses the precision recorded
in its resume state instead (train.py), so re-measuring never changes a run half-way.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

#: bf16 autocast is chosen when its median speed-up over fp32 on the workload is at least this.
MIN_SPEEDUP = 1.1
#: A kept answer older than this (seconds) is measured again.
MAX_AGE_S = 30 * 24 * 3600
#: Timed rounds (each times both precisions, in alternating order); up to twice as many when unclear.
ROUNDS = 4
#: Relative spread (max-min over median) of one precision's own timings above which a measurement is noisy.
MAX_SPREAD = 0.25
_FILE = "bf16-auto.json"
_LOCK = threading.Lock()  # the server's threads may ask at once: one probe, one write
_DECIDED: dict[str, "Decision"] = {}  # this process's decisions by workload key


@dataclass(frozen=True)
class Workload:
    """The real work a precision is chosen for."""

    key: str
    """What the answer is for (kind and shape, e.g. "train llama d576x30 b10 t64"): answers are kept per key."""
    step: Callable[[], None]
    """Runs one step of the work under the ambient autocast setting; must not change any state."""


@dataclass(frozen=True)
class Decision:
    """One measurement: the speed-up of bf16 over fp32 and whether it is clear enough to keep."""

    speedup: float
    ratios: tuple[float, ...]
    clear: bool
    measured_at: float
    load: float
    """The 1-minute load average when measuring (recorded for the reader; noise is judged from the timings)."""

    @property
    def bf16(self) -> bool:
        return self.speedup >= MIN_SPEEDUP


def bf16_wanted(mode: str, device: torch.device, workload: Workload | None = None) -> bool:
    """Resolve an auto/on/off bf16 setting for `device`; auto: only where bf16 is measured faster on
    `workload` (default: a small matmul of the default model's shape, for callers without one)."""
    if mode != "auto":
        return mode == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not cpu_has_bf16_units():
        return False
    return decide(workload or matmul_workload()).bf16


def cpu_has_bf16_units() -> bool:
    """AVX512_BF16 or AMX: without them bf16 is emulated (never worth it)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def describe_cpu() -> str:
    """What bf16 autocast does on this CPU (the default matmul workload), for benchmark reports."""
    if not cpu_has_bf16_units():
        return "no bf16 units"
    found = decide(matmul_workload())
    verdict = "bf16 autocast used" if found.bf16 else "fp32 used"
    return f"bf16 units, bf16 matmul {found.speedup:.2f}x the speed of fp32: {verdict}"


def machine_key() -> str:
    return f"{cpu_name()} | {os.cpu_count()} cores | {torch.get_num_threads()} threads | torch {torch.__version__}"


def decide(workload: Workload) -> Decision:
    """The kept answer for this machine and workload if it is clear and recent, else a new measurement."""
    with _LOCK:
        if workload.key in _DECIDED:
            return _DECIDED[workload.key]
        path, machine = _cache_file(), machine_key()
        known = _read(path)
        entry = known.get(machine, {}).get(workload.key)
        found = _from_entry(entry)
        if found is None:
            found = measure(workload)
            if found.clear:
                known.setdefault(machine, {})[workload.key] = _to_entry(found)
                _write(path, known)
        _DECIDED[workload.key] = found
        return found


def measure(workload: Workload, rounds: int = ROUNDS) -> Decision:
    """Time `workload.step` in fp32 and bf16 autocast, alternating which goes first, after one untimed warm-up
    each; rounds are doubled once when the first ones are unclear."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    for precision_bf16 in (False, True):  # warm-up: oneDNN picks and caches its kernels on the first call
        _timed(workload, precision_bf16)
    times: dict[bool, list[float]] = {False: [], True: []}
    _rounds(workload, rounds, times)
    decision = _judge(times, load)
    if not decision.clear:  # one more set of rounds before settling for an unclear (unkept) answer
        _rounds(workload, rounds, times)
        decision = _judge(times, load)
    return decision


def _rounds(workload: Workload, rounds: int, times: dict[bool, list[float]]) -> None:
    for r in range(rounds):
        for bf16 in ((False, True) if r % 2 == 0 else (True, False)):
            times[bf16].append(_timed(workload, bf16))


def _timed(workload: Workload, bf16: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        start = time.perf_counter()
        workload.step()
        return time.perf_counter() - start


def _judge(times: dict[bool, list[float]], load: float) -> Decision:
    """Median of the per-round ratios; clear when every ratio is on the same side of the margin and each
    precision's own timings are steady."""
    ratios = tuple(round(f / b, 3) for f, b in zip(times[False], times[True]))
    speedup = round(statistics.median(ratios), 3)
    same_side = all(r >= MIN_SPEEDUP for r in ratios) or all(r < MIN_SPEEDUP for r in ratios)
    steady = all((max(t) - min(t)) / statistics.median(t) <= MAX_SPREAD for t in times.values())
    return Decision(speedup, ratios, same_side and steady, time.time(), round(load, 2))


def _to_entry(found: Decision) -> dict:
    return {"speedup": found.speedup, "ratios": list(found.ratios), "measured_at": round(found.measured_at),
            "load": found.load}


def _from_entry(entry) -> Decision | None:
    """A kept answer that is still good, or None (absent, damaged, or older than MAX_AGE_S)."""
    try:
        found = Decision(float(entry["speedup"]), tuple(entry["ratios"]), True, float(entry["measured_at"]),
                         float(entry["load"]))
    except (TypeError, KeyError, ValueError):
        return None
    return found if 0 <= time.time() - found.measured_at <= MAX_AGE_S else None


def matmul_workload(rows: int = 160, d_in: int = 576, d_out: int = 1536) -> Workload:
    """A stand-in for callers with no real step: one matmul of SmolLM2-135M's MLP shape, 20 times."""
    gen = torch.Generator().manual_seed(0)
    x, layer = torch.randn(rows, d_in, generator=gen), torch.nn.Linear(d_in, d_out)

    def step() -> None:
        with torch.no_grad():
            for _ in range(20):
                layer(x)

    return Workload(f"matmul {rows}x{d_in}x{d_out}", step)


def shape_bucket(n: int) -> int:
    """`n` rounded up to a power of two: workloads of similar size share one kept answer."""
    return 1 << max(0, int(n) - 1).bit_length()


def model_key(model) -> str:
    cfg = model.config
    hidden = getattr(cfg, "hidden_size", getattr(cfg, "d_model", "?"))
    layers = getattr(cfg, "num_hidden_layers", getattr(cfg, "num_layers", "?"))
    return f"{cfg.model_type} d{hidden}x{layers}"


def _cache_file() -> Path:
    from .base_model import cache_root

    return cache_root() / _FILE


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: measure again and rewrite it
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)}  # drops the old one-number-per-machine format


def _write(path: Path, known: dict) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # write then rename: no reader sees half a file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(known, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache folder: decide for this process only, and say so
        warnings.warn(f"could not keep the bf16 speed probe in {path} ({err}); other processes will measure "
                      "again. Set PREFIXTUNE_CACHE to a writable folder.")


def store_frozen_linears(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Hold every frozen linear layer's weight and bias in `dtype`, once; returns how many layers changed.

    Why: autocast caches its casts only for leaf tensors that require grad, so under bf16 autocast every
    *frozen* fp32 weight is re-cast in every op of every step. Stored in bf16 they are used as they are.
    The result is bit-identical to autocast over the fp32 weights (autocast rounds the same weights to the
    same dtype; tested), but from then on the model must run under autocast to `dtype`. Embeddings and
    norms stay fp32; a head tied to the embedding matrix gets its own copy (the embedding is not rounded).
    Linear layers are `nn.Linear` and transformers' `Conv1D` (GPT-2), both of which autocast handles.
    """
    changed = 0
    for module in model.modules():
        if not (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"):
            continue
        params = [name for name, p in module.named_parameters(recurse=False) if not p.requires_grad]
        if not params or len(params) != len(list(module.parameters(recurse=False))):
            continue  # a trainable layer (the prefix MLP) keeps its fp32 master weights
        for name in params:
            value = getattr(module, name).detach().to(dtype)
            setattr(module, name, torch.nn.Parameter(value, requires_grad=False))
        changed += 1
    return changed
