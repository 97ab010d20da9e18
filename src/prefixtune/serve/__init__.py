"""`prefixtune serve`: one frozen base model, many prefixes (tasks), one HTTP server.

- settings.py: ServeSettings and the CLI flags (no web framework: `prefixtune --help` needs no [serve]);
- app.py: the FastAPI app (auth/size gate, errors, task and ops routes) and `cli_main`;
- routes.py: POST /v1/generate; schema.py: request/response bodies and the error shape;
- scheduler.py: the queue and the worker that feeds the decoding engine (decoding/); rows.py: a request's
  rows and their events; store.py: the prefix directory; metrics.py: Prometheus counters.
"""

from __future__ import annotations

from .settings import TASK_NAME, ServeSettings, add_cli_arguments, settings_from_args

_LAZY = {"create_app": "app", "cli_main": "app", "load_task": "store", "load_prefix_dir": "store", "task_dir": "store"}
"""Names whose modules import the web framework ([serve] extra): loaded on first use."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TASK_NAME", "ServeSettings", "add_cli_arguments", "settings_from_args", *_LAZY]
