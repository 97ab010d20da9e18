"""Whether bf16 autocast pays off on a device: the one place that resolves `bf16="auto"`.

Why it measures instead of reading CPU flags: the flags do not tell. Without AVX512_BF16 or AMX, oneDNN
still calls bf16 "supported" on AVX-512 CPUs and emulates it, much slower than fp32, so such CPUs get
fp32 without measuring. With AVX512_BF16 it can still lose: on some CPUs with avx512_bf16 but no AMX,
bf16 autocast is slower than fp32 for training and beam decoding, while on others it is clearly faster
(the measured numbers are in the README's main-job section and bench/results/e2e_main-*.md). So on a
CPU with bf16 units `auto` times one matmul of the default model's shape both ways, once per machine,
and keeps the answer in the cache folder: every process there (train, a resumed train, evaluate, serve)
then picks the same precision, which keeps resumed training bit-identical.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import warnings
from pathlib import Path

import torch

#: bf16 autocast is chosen when it runs the probe matmul at least this many times faster than fp32.
MIN_SPEEDUP = 1.15
#: The probe: (rows, in) @ (in, out), SmolLM2-135M's MLP up-projection for 160 decoding rows.
_PROBE_SHAPE = (160, 576, 1536)
_FILE = "bf16-auto.json"
_LOCK = threading.Lock()  # the server's threads may ask at once: one probe, one write


def bf16_wanted(mode: str, device: torch.device) -> bool:
    """Resolve an auto/on/off bf16 setting for `device`; auto: only where bf16 is measured faster."""
    if mode != "auto":
        return mode == "on"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not cpu_has_bf16_units():
        return False
    return cpu_bf16_speedup() >= MIN_SPEEDUP


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
    """What bf16 autocast does on this CPU, for benchmark reports."""
    if not cpu_has_bf16_units():
        return "no bf16 units"
    verdict = "bf16 autocast used" if bf16_wanted("auto", torch.device("cpu")) else "fp32 used"
    return f"bf16 units, bf16 matmul {cpu_bf16_speedup():.2f}x the speed of fp32: {verdict}"


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16-autocast time of the probe matmul on this machine, measured once and cached."""
    with _LOCK:
        return _stored_or_measured()


def _stored_or_measured() -> float:
    path = _cache_file()
    key = f"{cpu_name()} | {os.cpu_count()} cores | {torch.get_num_threads()} threads | torch {torch.__version__}"
    known = _read(path)
    if isinstance(known.get(key), (int, float)):
        return float(known[key])
    speedup = round(_measure(), 3)
    known[key] = speedup
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # write then rename: no reader sees half a file
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(known, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as err:  # a read-only cache folder: decide for this process only, and say so
        warnings.warn(f"could not keep the bf16 speed probe in {path} ({err}); other processes will measure "
                      "again and may pick another precision. Set PREFIXTUNE_CACHE to a writable folder.")
    return speedup


def _cache_file() -> Path:
    from .models import cache_root

    return cache_root() / _FILE


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # absent or damaged: measure again and rewrite it
        return {}
    return data if isinstance(data, dict) else {}


def _measure(repeats: int = 5, calls: int = 20) -> float:
    """Best-of-`repeats` time of `calls` probe matmuls, fp32 over bf16 autocast."""
    rows, d_in, d_out = _PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x, layer = torch.randn(rows, d_in, generator=gen), torch.nn.Linear(d_in, d_out)

    def best(bf16: bool) -> float:
        times = []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            layer(x)  # warm-up: oneDNN picks and caches its kernel on the first call
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                times.append(time.perf_counter() - start)
        return min(times)

    return best(False) / best(True)
