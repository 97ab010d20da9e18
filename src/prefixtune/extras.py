"""Optional dependencies (pip extras): which feature needs which packages, and the one-line error when
one is missing.

The core install (`pip install prefixtune`) trains, generates and evaluates loss; scoring, serving, the
loss plot and the GGUF default model each need an extra. A module that imports an extra's package does
so inside `needs(EXTRA)`, so a missing package surfaces as `MissingExtra` (an ImportError) whose message
names the extra to install, and the CLI prints that one line and exits with status 2 instead of a
traceback. pyproject.toml declares the same extras; tests/test_packaging.py checks the two agree.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

EXTRAS: dict[str, dict[str, str]] = {
    "serve": {"fastapi": "fastapi", "uvicorn": "uvicorn", "httpx": "httpx",
              "prometheus_client": "prometheus-client", "starlette": "fastapi", "pydantic": "fastapi"},
    "metrics": {"sacrebleu": "sacrebleu", "pycocoevalcap": "pycocoevalcap", "rouge_score": "rouge-score",
                "unidecode": "unidecode"},
    "plots": {"matplotlib": "matplotlib"},
    "gguf": {"gguf": "gguf"},
    "ray": {"ray": "ray"},
    "track": {"tensorboard": "tensorboard"},
}
"""extra -> {top-level import name: the distribution in that extra that installs it} for every optional
runtime package (starlette and pydantic come with fastapi, and our modules import them directly)."""

FEATURES = {"serve": "`prefixtune serve`", "metrics": "scoring with the official metrics",
            "plots": "the loss-curve plot", "gguf": "loading a GGUF model (the default smollm2-135m)",
            "ray": "serving replicas on Ray Serve (`prefixtune serve --ray`)",
            "track": "`train --report-to tensorboard`"}
"""extra -> what a user was doing when it was found missing (the start of the error message)."""


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the extra that brings it."""

    def __init__(self, extra: str, module: str) -> None:
        self.extra = extra
        super().__init__(f"{FEATURES[extra]} needs the package {module!r}, which is not installed: "
                         f"{install_hint(extra)}", name=module)


def install_hint(extra: str) -> str:
    """The pip command that installs `extra`."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {sorted(EXTRAS)}")
    return f"pip install 'prefixtune[{extra}]'"


@contextlib.contextmanager
def needs(extra: str) -> Iterator[None]:
    """Imports inside this block that fail for one of `extra`'s packages raise MissingExtra; any other
    import error (a broken install, a missing core package) passes through unchanged."""
    install_hint(extra)  # an unknown extra name is a bug here, not a missing package
    try:
        yield
    except ModuleNotFoundError as err:
        top = (err.name or "").partition(".")[0]
        if top not in EXTRAS[extra]:
            raise
        raise MissingExtra(extra, top) from err


def require(extra: str) -> None:
    """Raise MissingExtra unless every package of `extra` can be imported (found without importing it),
    for a package that a dependency imports on our behalf (transformers imports gguf)."""
    install_hint(extra)
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise MissingExtra(extra, module)


#: --report-to trackers other than tensorboard: their own (large, fast-moving) packages, left out of the
#: extras and so out of the tested pins; name -> (import name, the pip command that installs it)
OTHER_TRACKERS = {"wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow")}


class MissingTracker(MissingExtra):
    """A `--report-to` tracker without an extra of its own (wandb, mlflow) is not installed."""

    def __init__(self, tracker: str) -> None:
        module, hint = OTHER_TRACKERS[tracker]
        self.extra = None
        ImportError.__init__(self, f"`train --report-to {tracker}` needs the package {module!r}, which is not "
                                   f"installed: {hint}", name=module)


def require_tracker(name: str) -> None:
    """Raise MissingExtra (MissingTracker) unless the `--report-to` tracker `name` can be imported: checked
    before any model or data is loaded, where accelerate would only warn and drop it."""
    if name == "none":
        return
    if name == "tensorboard":
        return require("track")
    if importlib.util.find_spec(OTHER_TRACKERS[name][0]) is None:
        raise MissingTracker(name)
