"""`prefixtune serve`: one frozen base model, many prefixes (tasks), one HTTP server.

- settings.py: ServeSettings and the CLI flags (no web framework: `prefixtune --help` needs no [serve]);
- app.py: the FastAPI app (auth/size gate, errors, task and ops routes) and `cli_main`;
- routes.py: POST /v1/generate; schema.py: request/response bodies and the error shape;
- scheduler.py: the queue and the worker that feeds the decoding engine (decoding/); rows.py: a request's
  rows and their events; store.py: the prefix directory; metrics.py: Prometheus counters.
"""

from __future__ import annotations

from .settings import TASK_NAME, ServeSettings, add_cli_arguments, settings_from_args

_APP_NAMES = ("create_app", "cli_main", "load_task", "load_prefix_dir", "task_dir")


def __getattr__(name: str):
    """The app and the store import the web framework ([serve] extra); loaded on first use."""
    if name in ("create_app", "cli_main"):
        from . import app

        return getattr(app, name)
    if name in ("load_task", "load_prefix_dir", "task_dir"):
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TASK_NAME", "ServeSettings", "add_cli_arguments", "settings_from_args", *_APP_NAMES]
