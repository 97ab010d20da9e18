"""`prefixtune score`, the CLI's handling of bad input, and flags derived from configs and the task registry."""

from __future__ import annotations

import dataclasses
import json

import pytest

from prefixtune.cli import _add_dataclass_options, _config_from, build_parser, main
from prefixtune.config import PrefixConfig, TrainConfig
from prefixtune.evaluate import TABLE_KEYS, format_table, score
from prefixtune.tasks import TASKS, MetricSet, SourceGroup


def test_score_with_references_file_prints_json(tmp_path, capsys):
    preds = tmp_path / "preds.txt"
    refs = tmp_path / "refs.txt"
    preds.write_text("the eagle is a pub .\nzizzi serves italian food .\n")
    refs.write_text("the eagle is a pub .\nthe eagle , a pub .\n\nzizzi serves italian food .\n")
    assert main(["score", "--task", "e2e", "--predictions", str(preds), "--references", str(refs), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"bleu", "nist", "meteor", "rouge_l", "cider"}
    assert scores["bleu"] == pytest.approx(100.0)


def test_score_count_mismatch_names_both_numbers(tmp_path, capsys):
    preds = tmp_path / "preds.txt"
    preds.write_text("one line\n")
    assert main(["score", "--task", "e2e", "--split", "test", "--predictions", str(preds)]) == 2
    assert "has 1 predictions but e2e/test has 630 sources" in capsys.readouterr().err


KNOWN = "'e2e', 'webnlg', 'dart', 'jsonl', 'summarization'"


@pytest.mark.parametrize("command", [["train"], ["score", "--predictions", "x"], ["evaluate", "--prefix", "p",
                                                                                  "--output", "o"]])
def test_unknown_task_exits_2_naming_the_known_tasks(command, capsys):
    with pytest.raises(SystemExit) as caught:  # refused while parsing, before any file or model is read
        main([*command, "--task", "nope"])
    assert caught.value.code == 2
    assert f"argument --task: invalid choice: 'nope' (choose from {KNOWN})" in capsys.readouterr().err


def test_unknown_task_in_the_library_is_an_error_not_another_tasks_metrics():
    known = "known tasks: e2e, webnlg, dart, jsonl, summarization"
    with pytest.raises(ValueError, match=f"unknown task 'nonexistent'; {known}"):
        score("nonexistent", ["a prediction"], [SourceGroup("s", ("a reference",), {})])
    with pytest.raises(ValueError, match=f"unknown task 'nonexistent'; {known}"):
        format_table("nonexistent", {"bleu": 1.0})


def test_score_and_table_come_from_the_registered_spec(monkeypatch, capsys):
    seen = []
    toy = MetricSet(lambda predictions, groups: seen.append((predictions, groups)) or {"a": 1.0, "b": 2.0, "c": 3.0},
                    table_keys=("c", "a"))
    monkeypatch.setitem(TASKS, "toy", dataclasses.replace(TASKS["jsonl"], name="toy", metrics=toy))
    groups = [SourceGroup("s", ("r",), {})]
    assert score("toy", ["p"], groups) == {"a": 1.0, "b": 2.0, "c": 3.0} and seen == [(["p"], groups)]
    assert format_table("toy", {"a": 1.0, "b": 2.0, "c": 3.0}).split("\n")[0].split() == ["c", "a"]
    assert TABLE_KEYS["e2e"] == list(TASKS["e2e"].metrics.table_keys)


def _help(command: str) -> str:
    return " ".join(build_parser()._subparsers._group_actions[0].choices[command].format_help().split())


@pytest.mark.parametrize("command", ["train", "evaluate", "score"])
def test_task_help_lists_every_registered_task_with_its_help_line(command):
    text = _help(command)
    for name, spec in TASKS.items():
        assert f"{name}: {' '.join(spec.description.split())}" in text


def test_prefix_flags_are_prefix_config_fields_with_their_docstrings():
    parser = build_parser()
    text = _help("train")
    for flag in ("--prefix-length", "--reparam", "--mlp-hidden", "--variant", "--init-text", "--init-fit-steps",
                 "--init-fit-lr", "--seed"):
        assert f"{flag} " in text, flag
    assert "Adam steps fitting the MLP output to the word activations. (default: 500)" in text
    args = parser.parse_args(["train", "--reparam", "table", "--init-fit-steps", "7", "--init-fit-lr", "0.5",
                              "--seed", "3", "--init-text", "table-to-text:"])
    cfg = _config_from(args, TrainConfig)
    assert cfg.prefix == PrefixConfig(prefix_length=None, reparam="table", init_text="table-to-text:",
                                      init_fit_steps=7, init_fit_lr=0.5)  # seed is TrainConfig's, set by resolve
    assert cfg.seed == 3 and _config_from(parser.parse_args(["train"]), TrainConfig) == TrainConfig()


@dataclasses.dataclass
class _Inner:
    width: int = 2
    """How wide."""
    label: str = "x"
    """Set by the outer config."""


@dataclasses.dataclass
class _Outer:
    name: str = "n"
    """A name."""
    inner: _Inner = dataclasses.field(default_factory=lambda: _Inner(width=5), metadata={"cli_skip": ("label",)})
    """Flattened."""


def test_nested_configs_are_flattened_into_flat_flags():
    import argparse

    parser = argparse.ArgumentParser()
    _add_dataclass_options(parser, _Outer)
    assert "--label" not in parser.format_help() and "How wide. (default: 5)" in parser.format_help()
    assert _config_from(parser.parse_args([]), _Outer) == _Outer()
    assert _config_from(parser.parse_args(["--width", "9", "--name", "m"]), _Outer) == _Outer("m", _Inner(9))


def test_missing_prefix_is_clear(tmp_path, capsys):
    assert main(["generate", "--prefix", "oops", "--input", str(tmp_path / "none.jsonl")]) == 2
    assert "expects NAME=DIR, got 'oops'" in capsys.readouterr().err


def test_generate_rejects_bad_jsonl_before_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "in.jsonl"
    bad.write_text('{"task": "e2e", "input": "ok"}\nnot json\n')
    assert main(["generate", "--prefix", f"e2e={tmp_path}", "--input", str(bad)]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
    bad.write_text('{"task": "other", "input": "ok"}\n')
    assert main(["generate", "--prefix", f"e2e={tmp_path}", "--input", str(bad)]) == 2
    assert "asks for task 'other'" in capsys.readouterr().err


def test_train_help_comes_from_config_docstrings():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--train-size" in text and "Low-data setting" in text and "--resume" in text


@pytest.mark.parametrize("command", ["train", "generate", "evaluate", "serve"])
def test_every_command_has_every_model_flag_with_its_docstring(command):
    """ModelConfig's fields, declared once, are flags of every command that loads a model; `train` gets them
    as TrainConfig's inherited fields, so their help must come from the base class's source."""
    if command == "serve":
        pytest.importorskip("fastapi", reason="serve needs the [serve] extra")
    from prefixtune.cli import _field_docs
    from prefixtune.config import ModelConfig

    text, docs = _help(command), _field_docs(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        assert f"--{f.name.replace('_', '-')} " in text, (command, f.name)
        assert docs[f.name].replace("%%", "%") in text, (command, f.name)
    assert _field_docs(TrainConfig)["device"] == docs["device"] and "train_size" in _field_docs(TrainConfig)


def test_model_flags_become_the_model_config(tmp_path):
    from prefixtune.cli import model_config
    from prefixtune.config import ModelConfig

    args = build_parser().parse_args(["generate", "--model", "org/m", "--revision", "v2", "--offline",
                                      "--trust-remote-code", "--device", "cpu", "--dtype", "bfloat16", "--allow-pickle"])
    assert model_config(args) == ModelConfig("org/m", True, "v2", True, True, "cpu", "bfloat16")
    assert model_config(build_parser().parse_args(["generate"])) == ModelConfig()
    train = _config_from(build_parser().parse_args(["train", "--device", "cpu", "--revision", "r"]), TrainConfig)
    assert (train.device, train.revision, train.model) == ("cpu", "r", "smollm2-135m")
