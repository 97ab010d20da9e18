"""The README's Python example runs as written (on the real default model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert printed.startswith("[") and (tmp_path / "runs" / "readme-demo" / "prefix.safetensors").is_file()


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "bash scripts/main.sh" in text and "bash scripts/test.sh" in text
    assert (README.parent / "scripts" / "main.sh").is_file() and (README.parent / "scripts" / "test.sh").is_file()
