"""Users' JSONL files (data-to-text and summarization): grouping, order and line-level errors."""

from __future__ import annotations

import json
import re

import pytest

from prefixtune.tasks import TASKS, load_groups, to_examples


def _write(tmp_path, lines: list[str], name: str = "data.jsonl"):
    file = tmp_path / name
    file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return file


def test_same_inputs_are_grouped_in_first_appearance_order(tmp_path):
    file = _write(
        tmp_path,
        [
            json.dumps({"input": "b", "output": "B1"}),
            json.dumps({"input": "a", "output": ["A1", "A2"]}),
            "",
            json.dumps({"input": "b", "output": "B2"}),
            json.dumps({"input": " a", "output": "kept apart: inputs are compared exactly"}),
        ],
    )
    groups = load_groups("jsonl", "train", path=str(file))
    assert [(g.source, g.references) for g in groups] == [
        ("b", ("B1", "B2")),
        ("a", ("A1", "A2")),
        (" a", ("kept apart: inputs are compared exactly",)),
    ]
    assert [e.target for e in to_examples(groups)] == ["B1", "B2", "A1", "A2", groups[2].references[0]]


def test_summarization_uses_document_and_summary(tmp_path):
    file = _write(
        tmp_path,
        [
            json.dumps({"document": "Long text.", "summary": "Short."}),
            json.dumps({"document": "Long text.", "summary": ["Brief."]}),
        ],
    )
    (group,) = load_groups("summarization", "test", path=str(file))
    assert (group.source, group.references, group.meta) == ("Long text.", ("Short.", "Brief."), {})
    assert TASKS["summarization"].kind == "summarization"
    assert TASKS["jsonl"].kind == "data-to-text"


@pytest.mark.parametrize(
    "line,problem",
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "expected a JSON object, found list"),
        ('{"output": "x"}', "missing key 'input'"),
        ('{"input": "x"}', "missing key 'output'"),
        ('{"input": "  ", "output": "x"}', "empty 'input'"),
        ('{"input": 3, "output": "x"}', "'input' must be a string, found int"),
        ('{"input": "x", "output": 3}', "'output' must be a string or a list of strings, found int"),
        ('{"input": "x", "output": ["ok", null]}', "'output' must be a string or a list of strings"),
        ('{"input": "x", "output": []}', "'output' is an empty list"),
        ('{"input": "x", "output": ""}', "empty 'output'"),
    ],
)
def test_bad_lines_name_file_line_and_problem(tmp_path, line, problem):
    file = _write(tmp_path, [json.dumps({"input": "fine", "output": "ok"}), "", line])
    with pytest.raises(ValueError, match=re.escape(f"{file}, line 3: {problem}")):
        load_groups("jsonl", "train", path=str(file))


def test_summarization_errors_name_its_keys(tmp_path):
    file = _write(tmp_path, [json.dumps({"input": "x", "output": "y"})])
    with pytest.raises(ValueError, match="line 1: missing key 'document'"):
        load_groups("summarization", "train", path=str(file))


def test_path_is_required(tmp_path):
    with pytest.raises(ValueError, match="task 'jsonl' reads your own file: pass path="):
        load_groups("jsonl", "train")
    with pytest.raises(ValueError, match="task 'summarization' reads your own file"):
        load_groups("summarization", "dev", data_dir=tmp_path)


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_groups("jsonl", "train", path=str(tmp_path / "nope.jsonl"))


def test_specs():
    for name in ("jsonl", "summarization"):
        spec = TASKS[name]
        assert spec.splits == ("train", "dev", "test")
        assert spec.default_split_for_training == "train"
