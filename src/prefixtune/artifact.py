"""How prefixtune's files are written and checked: staged writes, checksums, finite tensors, stale temporaries.

Every file a run leaves (a prefix, a resume state) is first written under a temporary name next to its
target and moved into place with `os.replace`, so a reader sees the old file or the new one, never half of
one. Temporary names carry the writer's process id: a save removes those of processes that are gone (a
kill -9 skips every `finally`), and never those of a process still writing.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load

STAGE_PREFIX = ".saving-"
_STAGE = re.compile(rf"^{re.escape(STAGE_PREFIX)}(\d+)-\w+$")


class DamagedFileError(ValueError):
    """A file prefixtune wrote cannot be used: unreadable, truncated, corrupted or holding non-finite values."""


class NonFiniteError(DamagedFileError):
    """Tensors hold NaN or infinite values: never saved, never loaded."""


def temporary_file(target: Path) -> Path:
    """The temporary name `target` is written under before it is moved into place."""
    return target.with_name(f".{target.name}.tmp{os.getpid()}")


def new_stage(directory: Path) -> Path:
    """A fresh staging directory inside `directory`, for files that must appear together."""
    stage = directory / f"{STAGE_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir()
    return stage


def staged_copies(directory: Path, name: str) -> list[Path]:
    """Files called `name` in `directory`'s staging directories (what an interrupted save had written)."""
    return sorted(p for p in directory.glob(f"{STAGE_PREFIX}*/{name}") if p.is_file())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _temporary_pid(path: Path, names: tuple[str, ...], stages: bool) -> int | None:
    """The writer's pid if `path` is a temporary of one of `names` (or, with `stages`, a staging directory)."""
    for name in names:
        prefix = f".{name}.tmp"
        if path.name.startswith(prefix) and path.name[len(prefix):].isdigit():
            return int(path.name[len(prefix):])
    match = _STAGE.match(path.name) if stages else None
    return int(match.group(1)) if match else None


def remove_stale(directory: Path, names: tuple[str, ...], stages: bool = False) -> list[str]:
    """Remove what interrupted saves of the files `names` (and, with `stages`, staging directories) left in
    `directory`; returns their names. Each writer cleans only its own kind: a staging directory may still hold
    the committed half of a pair that only the next save of that pair replaces. This process's temporaries
    count as stale: it calls this only once its own save has finished."""
    removed = []
    for path in directory.iterdir() if directory.is_dir() else ():
        pid = _temporary_pid(path, names, stages)
        if pid is None or (pid != os.getpid() and _alive(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


def fsync(path: Path) -> None:
    """Flush a written file to disk before it is renamed into place: a rename can reach the disk before the
    data it names, and after a crash the new name would then hold an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """Checksum of names, dtypes, shapes and bytes, in name order: what a file's metadata can carry about the
    tensors of the same file (a checksum of the file itself would have to include itself)."""
    digest = hashlib.blake2b(digest_size=32)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def require_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise NonFiniteError naming `where` and the first offending tensors if any holds NaN or inf."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteError(f"{where}: {'tensors' if len(bad) > 1 else 'tensor'} {shown} "
                             f"{'hold' if len(bad) > 1 else 'holds'} non-finite values (NaN or inf)")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; DamagedFileError naming the file when it cannot be read.

    The tensors are copies in memory, not views mapped onto the file (what `load_file` returns): a prefix
    file rewritten in place later (`cp`, PEFT's save_pretrained) must not change, or with a truncation
    SIGBUS, a prefix that a server already holds. Prefix files are small, so reading them whole is cheap."""
    try:
        data = Path(path).read_bytes()
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load(data), metadata
    except (SafetensorError, OSError, ValueError) as err:
        detail = " ".join(str(err).split())
        raise DamagedFileError(f"{path} is not a readable safetensors file (truncated or corrupted: {detail})") from None


__all__ = ["DamagedFileError", "NonFiniteError", "temporary_file", "new_stage", "staged_copies", "remove_stale",
           "fsync", "sha256_file", "tensors_digest", "require_finite", "read_safetensors"]
