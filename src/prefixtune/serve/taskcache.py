"""The resident task set: at most `max_tasks` prefixes in memory, least recently used evicted, tasks on
disk under the prefix directory loaded on their first request.

Eviction only drops the task table's reference (`MultiPrefixModel.remove`): a row already queued or
decoding holds its own reference to the prefix tensors (`Row.prefix`), so it finishes unchanged.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from ..config import TextFormat
from ..multi import MultiPrefixModel, NamedPrefix
from .metrics import Metrics
from .schema import ApiError
from .store import holds_prefix, load_prefix_dir, load_task, task_dir

_LISTED = 20
"""Loaded task names an unknown-task error lists at most (a server may hold thousands)."""


class TaskCache:
    """Which tasks are resident in `multi`, in least-recently-used order, and loading on demand.

    Only tasks that can be loaded again from `root` are ever evicted: pinned tasks, explicit
    `--prefix NAME=PATH` tasks and tasks added in memory stay. Thread-safe: a hit holds a short lock
    (it runs on the event loop); loads run one at a time under a second lock (in worker threads), so two
    requests for the same missing task load it once and a load never holds up a hit.

    `peft_format` is the text format of tasks that are PEFT checkpoints (PEFT saves none; None: the default).
    """

    def __init__(self, multi: MultiPrefixModel, metrics: Metrics, root: Path | None, max_tasks: int | None = None,
                 pins: Sequence[str] = (), peft_format: TextFormat | None = None):
        self.multi, self.metrics, self.root, self.peft_format = multi, metrics, root, peft_format
        self.max_tasks, self.pins = max_tasks, frozenset(pins)
        self._order: OrderedDict[str, bool] = OrderedDict()
        """Resident task names, least recently used first -> whether the task may be evicted."""
        self._retired: set[str] = set()
        """Names unloaded with DELETE: not loaded on demand again until PUT (`load`)."""
        self._lock = threading.Lock()
        """Guards `_order` and `_retired`; held only briefly."""
        self._loading = threading.RLock()
        """Held while the task table changes from disk or DELETE (loads, removals)."""

    def start(self) -> None:
        """Load what must be resident at start: every task of the directory when unbounded, else the pins.

        Raises ValueError for a pin that cannot be loaded, or when the unevictable tasks leave no room.
        """
        if self.root is not None and self.max_tasks is None:
            load_prefix_dir(self.multi, self.root, self.peft_format)
        for name in sorted(self.pins):
            if self.root is None:
                raise ValueError(f"--pin {name}: pinning needs --prefix-dir")
            try:
                self.load(name)
            except ApiError as err:
                raise ValueError(f"--pin {name}: {err.message}") from None
        with self._lock:
            for name, task in self.multi.tasks().items():
                self._register(name, task)
            fixed = [n for n, evictable in self._order.items() if not evictable]
            if self.max_tasks is not None and len(fixed) >= self.max_tasks:
                raise ValueError(f"--max-tasks {self.max_tasks} leaves no room for tasks loaded on demand: "
                                 f"{len(fixed)} tasks are pinned or given with --prefix; raise --max-tasks")

    def get(self, name: str) -> NamedPrefix:
        """The task, loaded from the prefix directory if it is not resident (ApiError 400/404/422 if it cannot be)."""
        task = self._hit(name)
        if task is not None:
            return task
        with self._loading:
            task = self._hit(name)  # loaded by the request this one waited for
            if task is not None:
                return task
            if name in self._retired:
                raise ApiError(404, "unknown_task", f"task {name!r} was unloaded (DELETE /v1/tasks/{name}); "
                               f"PUT /v1/tasks/{name} loads it again")
            if self._on_disk(name):
                self.metrics.cache_misses.inc()
                return self.load(name)
            raise ApiError(404, "unknown_task", f"unknown task {name!r}: not loaded and not in the prefix directory; "
                           f"loaded tasks: {self._listing()}")

    def resident(self, name: str) -> NamedPrefix | None:
        """The task if it is resident (no loading, no counting)."""
        return self.multi.tasks().get(name)

    def load(self, name: str) -> NamedPrefix:
        """(Re)load `name` from the prefix directory and make it the most recently used; evict if over the limit."""
        if self.root is None:
            raise ApiError(400, "no_prefix_dir", "this server was started without a prefix directory")
        with self._loading:
            task = load_task(self.multi, self.root, name, self.peft_format)
            with self._lock:
                self._retired.discard(name)
                self._order.pop(name, None)
                self._register(name, task)
                self._evict(keep=name)
            return task

    def remove(self, name: str) -> None:
        """Unload `name` and keep it from loading on demand until `load` (ApiError 404 if there is no such task)."""
        with self._loading, self._lock:
            if self.resident(name) is None and (name in self._retired or not self._on_disk(name)):
                raise ApiError(404, "unknown_task", f"unknown task {name!r}; loaded tasks: {self._listing()}")
            if self.resident(name) is not None:
                self.multi.remove(name)
            self._order.pop(name, None)
            self._retired.add(name)

    # --- changes on disk (storewatch.StoreWatch) -----------------------------------------------------
    def refresh(self, name: str) -> bool:
        """`root`/name was added or replaced on disk: reload it if it is resident from there, load it if every task
        of the directory is kept (no max_tasks); else leave it to load on demand. Whether it was (re)loaded.

        A task DELETEd through the API, or one given with --prefix NAME=PATH, is left alone (both were chosen
        by hand). Raises ApiError when the files cannot be loaded (half written): the old task stays."""
        with self._loading:
            task = self.resident(name)
            if name in self._retired or (task is not None and not self._reloadable(name, task)):
                return False
            if task is None and self.max_tasks is not None:
                return False
            self.load(name)
            return True

    def forget(self, name: str) -> bool:
        """`root`/name was deleted on disk: unload it if it came from there (not retired: it loads again once
        its files are back). Whether it was unloaded."""
        with self._loading, self._lock:
            task = self.resident(name)
            if task is None or not self._reloadable(name, task) or name in self.pins:
                return False
            self.multi.remove(name)
            self._order.pop(name, None)
            return True

    # --- internals ---------------------------------------------------------------------------------
    def _hit(self, name: str) -> NamedPrefix | None:
        with self._lock:
            task = self.multi.tasks().get(name)
            if task is not None:
                self.metrics.cache_hits.inc()
                self._register(name, task)
            return task

    def _on_disk(self, name: str) -> bool:
        """Whether `root`/name holds a saved prefix or a PEFT checkpoint; task_dir answers 400 for a bad name or
        one outside `root`."""
        return self.root is not None and holds_prefix(task_dir(self.root, name))

    def _register(self, name: str, task: NamedPrefix) -> None:
        if name not in self._order:
            self._order[name] = self._reloadable(name, task) and name not in self.pins
        self._order.move_to_end(name)

    def _reloadable(self, name: str, task: NamedPrefix) -> bool:
        """Whether the task came from `root`/name, so that evicting it loses nothing."""
        if self.root is None or not task.source:
            return False
        try:
            return Path(task.source).resolve() == task_dir(self.root, name)
        except ApiError:
            return False

    def _evict(self, keep: str) -> None:
        if self.max_tasks is None:
            return
        resident = self.multi.tasks()
        for name in [n for n in self._order if n not in resident]:  # removed behind the cache's back
            del self._order[name]
        victims = [n for n, evictable in self._order.items() if evictable and n != keep]
        for name in victims[: max(0, len(self._order) - self.max_tasks)]:
            self.multi.remove(name)
            del self._order[name]
            self.metrics.cache_evictions.inc()

    def _listing(self) -> str:
        names = sorted(self.multi.tasks())
        more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
        return (", ".join(names[:_LISTED]) or "none") + more
