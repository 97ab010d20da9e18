"""`prefixtune export --to peft`: a saved prefix becomes a PEFT PrefixTuning checkpoint that PEFT itself loads
and runs with prefixtune's logits; refusals are one line, exit 2, and leave nothing behind."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")

from conftest import tiny_model  # noqa: E402
from prefixtune import MultiPrefixModel, PrefixConfig, PrefixTuningModel  # noqa: E402
from prefixtune.cli import main  # noqa: E402
from prefixtune.peft_import import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, load_peft_prefix  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save_prefix(family: str, directory, length: int = 5, name_or_path: str = "", **config) -> PrefixTuningModel:
    """A random prefix (scaled up, so that it changes the logits a lot) for `family`, saved into `directory`."""
    base = tiny_model(family)
    base.config._name_or_path = name_or_path
    ptm = PrefixTuningModel(base, PrefixConfig(prefix_length=length, reparam="table", seed=3, **config))
    with torch.no_grad():
        for enc in ptm.encoders.values():
            enc.table.mul_(3.0)
    ptm.save_pretrained(directory)
    return ptm


def export(capsys, prefix_dir, out, to: str = "peft") -> tuple[int, str]:
    code = main(["export", "--to", to, "--prefix", str(prefix_dir), str(out)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "opt"])
def test_peft_loads_the_export_with_prefixtunes_logits(family, tmp_path, capsys):
    """llama: grouped-query attention (2 kv heads of 6); gpt2: fused qkv, learned positions."""
    save_prefix(family, tmp_path / "prefix", name_or_path=f"tiny/{family}")
    code, err = export(capsys, tmp_path / "prefix", tmp_path / "out")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]
    config = json.loads((tmp_path / "out" / PEFT_CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == f"tiny/{family}" and config["peft_type"] == "PREFIX_TUNING"

    pm = peft.PeftModel.from_pretrained(tiny_model(family), tmp_path / "out").eval()
    ours = PrefixTuningModel.from_pretrained(tiny_model(family), tmp_path / "prefix")
    multi = MultiPrefixModel(tiny_model(family))
    multi.add("t", tmp_path / "prefix")
    ids = torch.randint(0, 250, (2, 7))
    with torch.no_grad():
        theirs = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        mine = ours(ids).logits
        plain = tiny_model(family)(input_ids=ids).logits
    assert theirs.shape == mine.shape
    assert (theirs - mine).abs().max() <= 1e-5
    assert (theirs - plain).abs().max() > 1e-2  # the prefix is really there, not dropped by PEFT
    greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=256, eos_token_id=None)
    assert torch.equal(pm.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), **greedy),
                       multi.generate_ids(ids[:1], ["t"], **greedy))


def test_export_then_import_gives_the_same_prefix(tmp_path, capsys):
    with torch.no_grad():
        saved = save_prefix("llama", tmp_path / "prefix", length=3).prefix_kv().detach()
    assert export(capsys, tmp_path / "prefix", tmp_path / "out")[0] == 0
    config = json.loads((tmp_path / "out" / PEFT_CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] is None  # unknown (a model built from a config) is said so, not guessed
    multi = MultiPrefixModel(tiny_model("llama"))
    back = load_peft_prefix(tmp_path / "out", multi.base, multi.shapes)
    assert back.shapes() == saved.shapes() and back.length == 3
    for slot, (k, v) in saved.kv.items():
        assert torch.equal(back.kv[slot][0], k) and torch.equal(back.kv[slot][1], v), slot


def test_encoder_decoder_is_refused_naming_the_model_type(tmp_path, capsys):
    save_prefix("bart", tmp_path / "prefix", length=2)
    code, err = export(capsys, tmp_path / "prefix", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "'bart'" in err and "encoder-decoder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prefix"]


def test_infix_is_refused(tmp_path, capsys):
    save_prefix("gpt2", tmp_path / "prefix", length=2, variant="infix")
    code, err = export(capsys, tmp_path / "prefix", tmp_path / "out")
    assert code == 2 and "infix" in err and not (tmp_path / "out").exists()


def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys):
    save_prefix("gpt2", tmp_path / "prefix", length=2)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    (tmp_path / "not-a-prefix").mkdir()
    cases = [(tmp_path / "prefix", tmp_path / "full", "peft", "exists and is not empty"),
             (tmp_path / "not-a-prefix", tmp_path / "out", "peft", "is not a saved prefix"),
             (tmp_path / "prefix", tmp_path / "out", "onnx", "'onnx' is not a known export format")]
    for prefix_dir, out, to, message in cases:
        code, err = export(capsys, prefix_dir, out, to)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    assert export(capsys, tmp_path / "prefix", tmp_path / "empty")[0] == 0  # an empty directory is taken
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME]


def test_a_failure_while_writing_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    from prefixtune import artifact

    save_prefix("gpt2", tmp_path / "prefix", length=2)
    before = sorted(p.name for p in tmp_path.iterdir())

    seen = []

    def full_disk(path):
        seen.append((tmp_path / "out").exists())  # what a reader (or a kill -9 now) would find
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(artifact, "fsync", full_disk)  # both files are written by now, neither flushed
    code, err = export(capsys, tmp_path / "prefix", tmp_path / "out")
    assert code == 2 and "No space left on device" in err
    assert seen == [False]  # written elsewhere: OUT appears only whole
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temporary beside it
