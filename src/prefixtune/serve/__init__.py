"""`prefixtune serve`: one frozen base model, many prefixes (tasks), one HTTP server.

- settings.py: ServeSettings and the CLI flags (no web framework: `prefixtune --help` needs no [serve]);
- app.py: the FastAPI app (auth/size gate, errors, task and ops routes) and `cli_main`;
- routes.py: POST /v1/generate; schema.py: request/response bodies and the error shape; admission.py:
  queueing a request's rows; served_route.py: the generate route with the task cache and per-row metrics;
- openai_routes.py, openai_schema.py, openai_choices.py: /v1/models, /v1/completions, /v1/chat/completions;
- scheduler.py: the queue and the worker that feeds the decoding engine (decoding/); rows.py: a request's
  rows and their events; store.py: the prefix directory; taskcache.py: the resident tasks (--max-tasks);
  storewatch.py: prefixes added/replaced/deleted on disk (--store-poll-s); ray_serve.py: --ray --replicas N;
  metrics.py: Prometheus metrics (prometheus_client); requestlog.py: per-request counting and JSON log lines.
"""

from __future__ import annotations

from .settings import TASK_NAME, ServeSettings, add_cli_arguments, settings_from_args

_LAZY = {"create_app": "app", "cli_main": "app", "load_task": "store", "load_prefix_dir": "store", "task_dir": "store"}
"""Names whose modules import the web framework ([serve] extra): loaded on first use."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        from ..extras import needs

        with needs("serve"):  # without the extra: one line naming it, not fastapi's ModuleNotFoundError
            return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TASK_NAME", "ServeSettings", "add_cli_arguments", "settings_from_args", *_LAZY]
