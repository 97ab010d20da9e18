"""artifact.read_safetensors: what it returns is independent of the file afterwards."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from prefixtune.artifact import read_safetensors


def test_tensors_read_do_not_follow_the_file_when_it_is_rewritten_in_place(tmp_path):
    path = tmp_path / "prefix.safetensors"
    save_file({"key": torch.zeros(64)}, str(path), metadata={"format": "pt"})
    tensors, metadata = read_safetensors(path)
    size = path.stat().st_size
    save_file({"key": torch.ones(64)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    with path.open("r+b") as f:  # same inode, new bytes: what `cp new DIR/` does to a served prefix
        f.write((tmp_path / "other.safetensors").read_bytes())
    assert path.stat().st_size == size
    assert read_safetensors(path)[0]["key"].eq(1).all()  # the file did change
    assert tensors["key"].eq(0).all() and metadata == {"format": "pt"}
