"""Loading base models offline: local directories, hub ids in the hub cache, .gguf files, clear errors for
unknown or unsupported models (downloads: test_hub_download.py; devices and dtypes: test_devices.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers

from conftest import save_tiny
from prefixtune._compat import UnsupportedModelError
from prefixtune.base_model import ModelFilesError, ModelNotFoundError, load_base_model


def test_local_directory_loads_with_pad_token(tmp_path):
    path = save_tiny(tmp_path / "m", "gpt2")
    model, tok = load_base_model(path)
    assert model.config.model_type == "gpt2" and not model.training
    assert tok.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32


def test_unknown_model_says_where_it_looked():
    with pytest.raises(ModelNotFoundError, match="'no-such-org/no-such-model-xyz': no local directory has that name, "
                                                 "and as a Hugging Face id it is not in the local cache .*offline"):
        load_base_model("no-such-org/no-such-model-xyz", offline=True)
    with pytest.raises(ModelNotFoundError, match="not an alias \\(smollm2-135m\\), not a .gguf file, not a local "
                                                 "directory, and not a valid Hugging Face id"):
        load_base_model("./no/such/dir")


def test_unsupported_model_refused_before_loading_weights(tmp_path):
    cfg = transformers.BloomConfig(vocab_size=300, hidden_size=32, n_layer=1, n_head=4)
    cfg.save_pretrained(tmp_path / "bloom")  # no weights: the config alone must be refused
    with pytest.raises(UnsupportedModelError, match="model_type 'bloom'.*BloomForCausalLM computes attention inside"):
        load_base_model(str(tmp_path / "bloom"))


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_model_name(bad):
    with pytest.raises(ModelNotFoundError, match="non-empty string"):
        load_base_model(bad)


def _hub_env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


_LOAD = """
import sys, torch
from prefixtune.base_model import load_base_model
model, tok = load_base_model(sys.argv[1])
ids = torch.tensor([[5, 9, 2, 7]])
with torch.no_grad():
    torch.save(model(ids).logits, sys.argv[2])
"""


def test_hub_id_loads_from_the_real_hub_cache_layout_offline(tmp_path):
    """A model in HF_HOME/hub/models--org--name/snapshots/<commit>/ (refs/main naming the commit) loads by
    its id with the network off, and is the model that was saved there."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "home" / "hub" / "models--tinyorg--tiny-llama"
    save_tiny(repo / "snapshots" / commit, "llama")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "logits.pt"
    run = subprocess.run([sys.executable, "-c", _LOAD, "tinyorg/tiny-llama", str(out)],
                         env=_hub_env(tmp_path / "home"), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    direct, _ = load_base_model(str(repo / "snapshots" / commit))
    with torch.no_grad():
        expected = direct(torch.tensor([[5, 9, 2, 7]])).logits
    torch.testing.assert_close(torch.load(out), expected, rtol=0, atol=0)


def test_hub_id_not_in_the_cache_fails_in_one_line_saying_how_to_get_it(tmp_path):
    (tmp_path / "home" / "hub").mkdir(parents=True)
    run = subprocess.run([sys.executable, "-m", "prefixtune", "generate", "--model", "tinyorg/not-cached",
                          "--prefix", "t=nowhere"], env=_hub_env(tmp_path / "home"), input="",
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "'tinyorg/not-cached'" in lines[0] and "hf download tinyorg/not-cached" in lines[0]
    assert str(tmp_path / "home" / "hub") in lines[0]


def test_gguf_path_that_is_missing_or_not_gguf_is_refused_in_one_line(tmp_path, monkeypatch):
    pytest.importorskip("gguf", reason="reading .gguf files needs the [gguf] extra")
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="GGUF file .*nope.gguf' does not exist"):
        load_base_model(str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelFilesError, match="cannot read the GGUF file .*bad.gguf"):
        load_base_model(str(bad))
    assert not list((tmp_path / "cache").glob("gguf/*")), "a failed dequantization left a cache folder"


@pytest.mark.slow
def test_gguf_file_path_loads_as_the_alias_does(tmp_path, monkeypatch):
    """Any .gguf path is dequantized into the cache and loads; here the file behind the default alias, which
    must give the alias's logits."""
    from prefixtune import base_model as models

    gguf = models._gguf_path(*models.ALIASES[models.DEFAULT_MODEL][:2])
    alias_model, _ = load_base_model(models.DEFAULT_MODEL)
    monkeypatch.setenv("PREFIXTUNE_CACHE", str(tmp_path / "cache"))
    by_path, tok = load_base_model(str(gguf))
    assert list((tmp_path / "cache" / "gguf").iterdir())[0].name.startswith(gguf.stem)
    ids = tok("name[The Eagle]", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(by_path(ids).logits, alias_model(ids).logits, rtol=0, atol=0)


def test_dequantizing_removes_what_killed_dequantizations_left(tmp_path, monkeypatch):
    """A dequantization killed mid-write leaves a full-size temporary copy: the next one removes those of
    dead processes and keeps a temporary of a process still writing."""
    pytest.importorskip("gguf", reason="dequantizing needs the [gguf] extra")
    from conftest import byte_tokenizer, tiny_model
    from prefixtune import artifact
    from prefixtune import base_model as models

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model("llama"))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: byte_tokenizer())
    target = tmp_path / "cache" / "gguf" / "m-0123"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = target.with_name(f".{target.name}.tmp{gone.pid}")
    live = target.with_name(f".{target.name}.tmp{os.getppid()}")
    for leftover in (dead, live):
        leftover.mkdir(parents=True)
        (leftover / "model.safetensors").write_bytes(b"half-written")
    assert models._dequantize(tmp_path / "m.gguf", target) == target
    assert (target / "config.json").is_file() and not artifact.temporary_file(target).exists()
    assert not dead.exists() and live.exists()
