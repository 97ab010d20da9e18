"""Watching the prefix directory: prefixes added, replaced or deleted on disk reach the task cache without a
restart (`ServeSettings.store_poll_s`).

Polling, not inotify: it works the same on network and container filesystems, which is where several
replicas (`--ray`) share one directory, and a few stat calls per task every couple of seconds cost nothing
next to decoding. A task's stamp is the mtime and size of its prefix_config.json and weights file (a PEFT
checkpoint's: adapter_config.json and adapter_model.safetensors); a stamp that changes while a prefix is
being written is loaded when the files read back whole (a half-written prefix fails to load, the old one
stays, and the next poll tries again).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .. import checkpoint
from ..peft_import import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from .schema import ApiError
from .settings import TASK_NAME
from .taskcache import TaskCache

logger = logging.getLogger("prefixtune.serve")

Stamp = tuple[int, int, int, int, int]
"""(kind, config mtime_ns, config size, weights mtime_ns, weights size); weights (0, 0) while missing. kind is
the index in `_KINDS`, so a directory that turns from one kind into the other is reloaded."""

_KINDS = ((checkpoint.CONFIG_NAME, checkpoint.WEIGHTS_NAME), (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME))
"""(config, weights) file names of a saved prefix, then of a PEFT checkpoint: the loader's order too (a
directory holding both is a saved prefix)."""


def _stamp(sub: Path) -> Stamp | None:
    for kind, (config_name, weights_name) in enumerate(_KINDS):
        try:
            config = (sub / config_name).stat()
        except OSError:
            continue
        try:
            weights = (sub / weights_name).stat()
            wstamp = (weights.st_mtime_ns, weights.st_size)
        except OSError:
            wstamp = (0, 0)
        return (kind, config.st_mtime_ns, config.st_size, *wstamp)
    return None


def scan(root: Path) -> dict[str, Stamp]:
    """Every task directory of `root` that holds a prefix_config.json or a PEFT adapter_config.json -> its stamp
    (missing or racing files skipped)."""
    stamps: dict[str, Stamp] = {}
    for sub in list(root.iterdir()):
        if not TASK_NAME.fullmatch(sub.name):
            continue
        stamp = _stamp(sub)
        if stamp is not None:
            stamps[sub.name] = stamp
    return stamps


class StoreWatch:
    """Applies the changes between two scans of the cache's directory to the cache; `poll` does one round
    (tests call it directly), `start` runs it every `period_s` seconds in a daemon thread until `stop`."""

    def __init__(self, cache: TaskCache, period_s: float):
        self.cache, self.period_s = cache, period_s
        self._seen: dict[str, Stamp] = scan(cache.root)  # what start() loaded is the baseline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> dict[str, list[str]]:
        """One round: {"loaded": [...], "unloaded": [...], "failed": [...]} (names, sorted)."""
        try:
            now = scan(self.cache.root)
        except OSError as err:  # the directory itself vanished or is unreadable (a remount): change nothing
            logger.warning("prefix store %s cannot be listed (%s); keeping the loaded tasks", self.cache.root, err)
            return {"loaded": [], "unloaded": [], "failed": []}
        loaded, unloaded, failed = [], [], []
        for name in sorted(set(self._seen) - set(now)):
            if self.cache.forget(name):
                unloaded.append(name)
            del self._seen[name]
        for name in sorted(n for n, stamp in now.items() if self._seen.get(n) != stamp):
            try:
                if self.cache.refresh(name):
                    loaded.append(name)
            except ApiError as err:  # half written, or broken: keep the old task and look again next round
                failed.append(name)
                logger.warning("prefix store: %s not (re)loaded yet: %s", name, err.message)
                continue
            self._seen[name] = now[name]
        if loaded or unloaded:
            logger.info("prefix store: loaded %s, unloaded %s", loaded or "none", unloaded or "none")
        return {"loaded": loaded, "unloaded": unloaded, "failed": failed}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prefixtune-store-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.poll()
            except Exception:  # a watch that dies silently would leave replicas serving stale prefixes forever
                logger.exception("prefix store: poll failed; trying again in %g s", self.period_s)
