"""Packaging: pyproject's ranges and extras against constraints.txt and extras.py, `--version`, and the
one-line hint (exit 2 on the CLI) when an optional package is missing, simulated by blocking its import."""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
import types
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

import prefixtune
from prefixtune import extras, runlog
from prefixtune.cli import main

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME_EXTRAS = set(extras.EXTRAS)


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, pinned = line.partition("==")
            assert sep and pinned, f"constraints.txt: {line!r} is not an exact NAME==VERSION pin"
            pins[_norm(name)] = pinned
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(key: str) -> list[Requirement]:
    return [Requirement(r) for r in PROJECT["optional-dependencies"][key]]


def test_core_dependencies_are_ranges_with_a_lower_bound_that_admits_the_tested_pin():
    pins = _constraints()
    for req in map(Requirement, PROJECT["dependencies"]):
        ops = {spec.operator for spec in req.specifier}
        assert "==" not in ops and ">=" in ops, f"core dependency {req} should be a range with a lower bound"
        assert _norm(req.name) in pins, f"core dependency {req.name} has no tested pin in constraints.txt"
        assert req.specifier.contains(pins[_norm(req.name)]), f"{req} excludes the tested {pins[_norm(req.name)]}"


@pytest.mark.parametrize("extra", sorted(RUNTIME_EXTRAS | {"dev"}))
def test_every_extras_package_is_pinned_in_constraints_within_its_range(extra):
    pins = _constraints()
    for req in _requirements(extra):
        assert _norm(req.name) in pins, f"[{extra}] needs {req.name}, which constraints.txt does not pin"
        assert req.specifier.contains(pins[_norm(req.name)]), f"[{extra}] {req} excludes the tested pin"


def test_extras_py_and_pyproject_declare_the_same_extras():
    declared = set(PROJECT["optional-dependencies"]) - {"all", "dev"}
    assert declared == RUNTIME_EXTRAS
    for extra in declared:
        assert {_norm(r.name) for r in _requirements(extra)} == set(map(_norm, extras.EXTRAS[extra].values())), extra
    (everything,) = _requirements("all")
    assert everything.name == "prefixtune" and everything.extras == RUNTIME_EXTRAS


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"prefixtune {version('prefixtune')}"
    assert version("prefixtune") == prefixtune.__version__, "reinstall: the installed metadata is stale"


@pytest.fixture
def block(monkeypatch):
    """block(module, *ours): `import module` fails as if it were not installed, and our modules whose names
    start with `ours` are forgotten so that they import again. Afterwards sys.modules and the packages'
    submodule attributes are as before, so no later test sees a module imported under the block."""
    saved = dict(sys.modules)

    def block(module: str, *ours: str) -> None:
        for name in [module, *(n for n in sys.modules if n.startswith(module + "."))]:
            monkeypatch.setitem(sys.modules, name, None)  # an imported submodule would otherwise still load
        for name in [n for n in sys.modules if n.startswith(ours)]:
            del sys.modules[name]
            parent, _, child = name.rpartition(".")  # `from . import metrics` reads the package attribute
            monkeypatch.delattr(sys.modules.get(parent, saved.get(parent)), child, raising=False)

    yield block
    monkeypatch.undo()
    added = [n for n in sys.modules if n not in saved]
    for name in added:
        del sys.modules[name]
    sys.modules.update(saved)
    for name in added + list(saved):
        parent, _, child = name.rpartition(".")
        package = saved.get(parent)
        current = getattr(package, child, None)
        if package is None or not isinstance(current, types.ModuleType) or current is saved.get(name):
            continue
        if name in saved:
            setattr(package, child, saved[name])
        elif current.__name__ == name:
            delattr(package, child)


def _installed(extra: str) -> pytest.MarkDecorator:
    """These tests block one package of `extra` and expect the hint to name it: the others must be there
    (the core-only run of scripts/check_wheel.sh has none of them)."""
    missing = [m for m in extras.EXTRAS[extra] if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"[{extra}] is not installed here ({', '.join(missing)})")


def _one_line_hint(err: str, extra: str, module: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and f"package {module!r}, which is not installed" in lines[0], lines[0]
    assert lines[0].endswith(f"pip install 'prefixtune[{extra}]'"), lines[0]


@_installed("serve")
@pytest.mark.parametrize("module", ["fastapi", "uvicorn", "prometheus_client"])
def test_serve_without_the_serve_extra_prints_one_line_and_exits_2(module, block, tmp_path, monkeypatch, capsys):
    block(module, "prefixtune.serve.")
    monkeypatch.setattr("prefixtune.base_model.load_base_model", _no_model)
    assert main(["serve", "--prefix-dir", str(tmp_path)]) == 2
    _one_line_hint(capsys.readouterr().err, "serve", module)


def _no_model(*_args, **_kwargs):
    raise AssertionError("the missing extra should be reported before the model is loaded")


def _predictions_and_references(tmp_path) -> list[str]:
    (tmp_path / "p.txt").write_text("a pub .\n")
    (tmp_path / "r.txt").write_text("a pub .\n")
    return ["--predictions", str(tmp_path / "p.txt"), "--references", str(tmp_path / "r.txt")]


@_installed("metrics")
@pytest.mark.parametrize("module", ["sacrebleu", "pycocoevalcap", "rouge_score", "unidecode"])
def test_score_without_the_metrics_extra_prints_one_line_and_exits_2(module, block, tmp_path, capsys):
    block(module, "prefixtune.metrics")
    assert main(["score", "--task", "e2e", *_predictions_and_references(tmp_path)]) == 2
    _one_line_hint(capsys.readouterr().err, "metrics", module)


@_installed("metrics")
def test_evaluate_reports_the_missing_metrics_extra_before_loading_a_model(block, tmp_path, monkeypatch, capsys):
    block("rouge_score", "prefixtune.metrics")
    monkeypatch.setattr("prefixtune.base_model.load_base_model", _no_model)
    assert main(["evaluate", "--task", "e2e", "--prefix", str(tmp_path), "--output", str(tmp_path / "o")]) == 2
    _one_line_hint(capsys.readouterr().err, "metrics", "rouge_score")


class _Prefix:
    base = torch.nn.Linear(1, 1)  # what the summary reads the base's dtype and device from

    def num_prefix_parameters(self) -> int:
        return 1


def test_training_without_the_plots_extra_finishes_and_says_why_there_is_no_plot(block, tmp_path, capsys):
    block("matplotlib")
    log = runlog.RunLog(tmp_path, main=True, show_progress=False)
    log.step(1, 0, 2.0, 1e-3, None, 0.1, bar=type("Bar", (), {"update": id, "set_postfix": dict})())
    with pytest.raises(extras.MissingExtra, match=re.escape("pip install 'prefixtune[plots]'")):
        log.plot()
    summary = log.finish({"step": 1, "best_dev": 2.0, "elapsed": 0.1}, "note", _Prefix())
    assert summary["steps"] == 1 and (tmp_path / "train_summary.json").is_file()
    assert not (tmp_path / "loss_curve.png").exists()
    assert "no loss_curve.png: the loss-curve plot needs the package 'matplotlib'" in capsys.readouterr().err


def test_loading_a_gguf_model_without_the_gguf_extra_names_it(tmp_path, monkeypatch):
    from prefixtune import base_model as models

    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_gguf_path", lambda package, filename: tmp_path / filename)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(extras.MissingExtra, match=re.escape("needs the package 'gguf', which is not installed: "
                                                            "pip install 'prefixtune[gguf]'")):
        models.materialize_alias(models.DEFAULT_MODEL)


def test_needs_passes_other_import_errors_through_and_refuses_an_unknown_extra():
    with pytest.raises(ModuleNotFoundError) as caught, extras.needs("serve"):
        import prefixtune_no_such_module  # noqa: F401
    assert not isinstance(caught.value, extras.MissingExtra)
    with pytest.raises(ValueError, match=r"unknown extra 'nope'; the extras are \['gguf', 'metrics'"):
        extras.install_hint("nope")
