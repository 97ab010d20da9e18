"""Loading base models offline: local directories, clear errors for unknown or unsupported models."""

from __future__ import annotations

import pytest
import torch
import transformers

from conftest import save_tiny
from prefixtune._compat import UnsupportedModelError
from prefixtune.models import ModelNotFoundError, load_base_model


def test_local_directory_loads_with_pad_token(tmp_path):
    path = save_tiny(tmp_path / "m", "gpt2")
    model, tok = load_base_model(path)
    assert model.config.model_type == "gpt2" and not model.training
    assert tok.pad_token is not None
    assert next(model.parameters()).dtype == torch.float32


def test_unknown_model_says_where_it_looked():
    with pytest.raises(ModelNotFoundError, match="not an alias \\(smollm2-135m\\).*never downloads"):
        load_base_model("no-such-org/no-such-model-xyz")


def test_unsupported_model_refused_before_loading_weights(tmp_path):
    cfg = transformers.BloomConfig(vocab_size=300, hidden_size=32, n_layer=1, n_head=4)
    cfg.save_pretrained(tmp_path / "bloom")  # no weights: the config alone must be refused
    with pytest.raises(UnsupportedModelError, match="model_type 'bloom'.*BloomForCausalLM computes attention inside"):
        load_base_model(str(tmp_path / "bloom"))


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_model_name(bad):
    with pytest.raises(ModelNotFoundError, match="non-empty string"):
        load_base_model(bad)
