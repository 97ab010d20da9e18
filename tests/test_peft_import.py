"""A PEFT PrefixTuning checkpoint imports and gives PEFT's own logits."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from conftest import PAD, tiny_model  # noqa: E402
from prefixtune import MultiPrefixModel, PrefixTuningModel  # noqa: E402
from prefixtune.checkpoint import PrefixMismatchError  # noqa: E402


def _peft_checkpoint(family, path, projection):
    model = tiny_model(family)
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, prefix_projection=projection,
                                  encoder_hidden_size=16)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_(0, 1.0)
    pm.eval()
    ids = torch.randint(0, 250, (2, 6))
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    pm.save_pretrained(path)
    return ids, logits


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("projection", [True, False])
def test_peft_import_matches_peft_forward(family, projection, tmp_path):
    ids, peft_logits = _peft_checkpoint(family, tmp_path, projection)
    ptm = PrefixTuningModel.from_peft(tiny_model(family), tmp_path)
    with torch.no_grad():
        ours = ptm(ids).logits
    assert ours.shape == peft_logits.shape
    assert (ours - peft_logits).abs().max() <= 1e-5


def test_peft_prefix_in_mixed_batch(tmp_path):
    _peft_checkpoint("llama", tmp_path, True)
    from prefixtune.peft_import import load_peft_prefix

    multi = MultiPrefixModel(tiny_model("llama"))
    multi.add("peft", load_peft_prefix(tmp_path, multi.base, multi.shapes))
    ids = torch.randint(0, 250, (1, 5))
    out = multi.generate_ids(ids, ["peft"], max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    ref = PrefixTuningModel.from_peft(tiny_model("llama"), tmp_path).generate(
        ids, max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(out, ref)


def test_peft_import_refuses_other_shape(tmp_path):
    _peft_checkpoint("gpt2", tmp_path, False)
    with pytest.raises(PrefixMismatchError, match="PEFT prefix .* needs width"):
        PrefixTuningModel.from_peft(tiny_model("llama"), tmp_path)


def test_not_a_peft_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a PEFT checkpoint"):
        PrefixTuningModel.from_peft(tiny_model("gpt2"), tmp_path)


def test_cli_generate_accepts_a_peft_directory_with_an_explicit_text_format(tmp_path, capsys):
    """`generate --prefix NAME=PEFT_DIR` runs the imported prefix, its text format the --peft-source-format
    template (PEFT saves none); the output equals MultiPrefixModel.generate with the imported prefix."""
    import json

    from conftest import byte_tokenizer, save_tiny
    from prefixtune import GenerateConfig
    from prefixtune.cli import main
    from prefixtune.config import TextFormat
    from prefixtune.peft_import import load_peft_prefix

    model_dir = save_tiny(tmp_path / "model")
    _peft_checkpoint("llama", tmp_path / "peft", True)  # the same tiny llama (seed 0) as the saved model
    (tmp_path / "in.jsonl").write_text(json.dumps({"task": "p", "input": "name[The Eagle]"}) + "\n")
    fmt = "Q: {input} A:{eos}"
    argv = ["generate", "--model", model_dir, "--prefix", f"p={tmp_path / 'peft'}", "--input",
            str(tmp_path / "in.jsonl"), "--num-beams", "1", "--max-new-tokens", "6", "--min-new-tokens", "6"]
    assert main([*argv, "--peft-source-format", fmt]) == 0
    got = json.loads(capsys.readouterr().out)["output"]
    multi = MultiPrefixModel(tiny_model("llama"), byte_tokenizer())
    multi.add("p", load_peft_prefix(tmp_path / "peft", multi.base, multi.shapes), TextFormat(source=fmt))
    config = GenerateConfig(num_beams=1, max_new_tokens=6, min_new_tokens=6)
    assert got == multi.generate(["name[The Eagle]"], ["p"], config)[0]
    multi.add("p", load_peft_prefix(tmp_path / "peft", multi.base, multi.shapes))  # the default format differs
    assert got != multi.generate(["name[The Eagle]"], ["p"], config)[0]
    assert main([*argv, "--peft-source-format", "no input field"]) == 2
    assert "must contain '{input}'" in capsys.readouterr().err
