"""The prefix directory, the server's only state: task names, loading, and skipping broken prefixes.

A task directory holds a saved prefixtune prefix or a PEFT PrefixTuning checkpoint (adapter_config.json +
adapter_model.safetensors). PEFT saves no text format, so PEFT tasks get the server's one
(`ServeSettings.peft_source_format`), passed in as `peft_format`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .. import checkpoint
from ..config import TextFormat
from ..multi import MultiPrefixModel, NamedPrefix
from ..peft_import import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, is_peft_checkpoint
from .schema import ApiError
from .settings import TASK_NAME

logger = logging.getLogger("prefixtune.serve")


def task_dir(root: Path, name: str) -> Path:
    """Directory of task `name` in `root`; refuses bad names and anything that resolves outside `root`."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ApiError(400, "invalid_task_name", f"invalid task name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
                       "starting with a letter or digit")
    base = root.resolve()
    path = (base / name).resolve()
    if path == base or not path.is_relative_to(base):
        raise ApiError(400, "invalid_task_name", f"task {name!r} resolves outside the prefix directory; refused")
    return path


def holds_prefix(path: Path) -> bool:
    """Whether directory `path` is a task: a saved prefix's config or a PEFT checkpoint's config is there (a
    missing weights file is the loader's to report: it may be half copied)."""
    return (path / checkpoint.CONFIG_NAME).is_file() or (path / PEFT_CONFIG_NAME).is_file()


def load_task(multi: MultiPrefixModel, root: Path, name: str, peft_format: TextFormat | None = None) -> NamedPrefix:
    """(Re)load task `name` from `root`/name (safetensors only): a saved prefix with its own text format, or a
    PEFT PrefixTuning checkpoint with `peft_format` (else the default)."""
    path = task_dir(root, name)
    try:
        return multi.add(name, path, peft_format if is_peft_checkpoint(path) else None)
    except FileNotFoundError:
        raise ApiError(404, "prefix_not_found", f"task {name!r}: no saved prefix in the prefix directory (expected "
                       f"{name}/{checkpoint.CONFIG_NAME} and {name}/{checkpoint.WEIGHTS_NAME}, or a PEFT "
                       f"checkpoint's {name}/{PEFT_CONFIG_NAME} and {name}/{PEFT_WEIGHTS_NAME})") from None
    except ValueError as err:  # PrefixMismatchError or a damaged prefix; hide server paths
        raise ApiError(422, "invalid_prefix", f"task {name!r}: " + _hide(str(err), root, name)) from None
    except Exception as err:  # damage the loader did not name (a reader's own error): still this prefix's fault
        raise ApiError(422, "invalid_prefix", f"task {name!r}: cannot read its prefix files ({type(err).__name__}: "
                       f"{_hide(str(err), root, name)}); save or copy the prefix again") from None


def _hide(message: str, root: Path, name: str) -> str:
    """`message` with the prefix directory's paths (as given and resolved) replaced by NAME and DIR."""
    for task_path, dir_path in ((root.resolve() / name, root.resolve()), (root / name, root)):
        message = message.replace(str(task_path), name).replace(str(dir_path), "DIR")
    return message


def public_source(task: NamedPrefix, root: Path | None) -> str:
    """Where a task came from, as clients may see it (no server paths): 'prefix_dir/NAME' for a task of the
    prefix directory, 'file' for one loaded from elsewhere (--prefix NAME=PATH), '' for one added in memory."""
    if not task.source:
        return ""
    if root is not None:
        try:
            return "prefix_dir/" + Path(task.source).resolve().relative_to(root.resolve()).as_posix()
        except ValueError:  # not under the prefix directory
            pass
    return "file"


def load_prefix_dir(multi: MultiPrefixModel, root: Path, peft_format: TextFormat | None = None) -> list[str]:
    """Load every task of `root` that is not loaded yet (explicit --prefix tasks win); skip broken ones."""
    loaded, have = [], set(multi.tasks())
    for sub in sorted(root.iterdir()):
        if sub.name in have or not holds_prefix(sub):
            continue
        try:
            load_task(multi, root, sub.name, peft_format)
            loaded.append(sub.name)
        except ApiError as err:
            logger.warning("skipping %s: %s", sub, err.message)
    return loaded


