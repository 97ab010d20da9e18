"""PrefixTuningModel: training touches only the prefix, save/load round trips, init from words, errors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import ENCODER_DECODER, PAD, tiny_model
from prefixtune import PrefixConfig, PrefixTuningModel
from prefixtune._compat import UnsupportedModelError
from prefixtune.checkpoint import CONFIG_NAME, WEIGHTS_NAME, PrefixMismatchError


def _train_steps(ptm, family, steps=3):
    opt = torch.optim.AdamW([p for p in ptm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 250, (2, 6))
    kwargs = {"decoder_input_ids": ids} if family in ENCODER_DECODER else {}
    for _ in range(steps):
        opt.zero_grad()
        loss = ptm(ids, labels=ids, **kwargs).loss
        loss.backward()
        opt.step()
    return loss


@pytest.mark.parametrize("family", ["gpt2", "llama", "bart", "t5"])
@pytest.mark.parametrize("reparam", ["mlp", "table", "embedding"])
def test_only_prefix_gets_gradients_and_base_is_bit_identical(family, reparam):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ptm = PrefixTuningModel(model, PrefixConfig(prefix_length=3, reparam=reparam, mlp_hidden=16))
    trainable = {n for n, p in ptm.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith("base.") for n in trainable)
    _train_steps(ptm, family)
    for n, p in ptm.named_parameters():
        if n.startswith("base."):
            assert p.grad is None, n
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_training_lowers_loss():
    ptm = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=4, mlp_hidden=32))
    torch.manual_seed(0)
    first = _train_steps(ptm, "llama", steps=1).item()
    last = _train_steps(ptm, "llama", steps=30).item()
    assert last < first


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_save_load_reproduces_generation_and_holds_only_the_prefix(family, tmp_path):
    model = tiny_model(family)
    ptm = PrefixTuningModel(model, PrefixConfig(prefix_length=4, reparam="mlp", mlp_hidden=16))
    _train_steps(ptm, family, steps=2)
    ids = torch.randint(0, 250, (2, 5))
    kw = dict(max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    expected = ptm.generate(ids, **kw)
    ptm.save_pretrained(tmp_path / "p")
    assert sorted(x.name for x in (tmp_path / "p").iterdir()) == ["README.md", WEIGHTS_NAME, CONFIG_NAME]  # + model card
    tensors = load_file(tmp_path / "p" / WEIGHTS_NAME)
    n_slots = len(ptm.slots)
    assert len(tensors) == 2 * n_slots and all(k.endswith((".key", ".value")) for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == ptm.num_prefix_parameters()
    meta = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
    assert meta["base_model"]["model_type"] == family and meta["prefix_length"] == 4
    fresh = tiny_model(family)  # same seed: same base weights
    loaded = PrefixTuningModel.from_pretrained(fresh, tmp_path / "p")
    assert torch.equal(loaded.generate(ids, **kw), expected)


def test_load_refuses_other_model_shape(tmp_path):
    PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=2)).save_pretrained(tmp_path / "p")
    with pytest.raises(PrefixMismatchError, match=r"made for llama .*2 layers x 2 kv heads x 8 dims.*this gpt2 model has \[self: 2 layers x 4 kv heads x 8 dims\]"):
        PrefixTuningModel.from_pretrained(tiny_model("gpt2"), tmp_path / "p")


def test_load_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a saved prefix"):
        PrefixTuningModel.from_pretrained(tiny_model("gpt2"), tmp_path / "nothing")


def test_failed_save_leaves_previous_prefix_intact(tmp_path, monkeypatch):
    ptm = PrefixTuningModel(tiny_model("gpt2"), PrefixConfig(prefix_length=2))
    ptm.save_pretrained(tmp_path / "p")
    before = (tmp_path / "p" / WEIGHTS_NAME).read_bytes()
    import prefixtune.checkpoint as ck

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ck.json, "dumps", boom)
    with pytest.raises(OSError, match="disk full"):
        ptm.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / WEIGHTS_NAME).read_bytes() == before
    assert sorted(x.name for x in (tmp_path / "p").iterdir()) == ["README.md", WEIGHTS_NAME, CONFIG_NAME]  # + model card


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_init_from_words_equals_reading_the_words(family, tokenizer):
    """With the word-initialised prefix, the model continues exactly as after reading those words."""
    model = tiny_model(family)
    words = "table-to-text:"
    ptm = PrefixTuningModel(model, PrefixConfig(reparam="table", init_text=words), tokenizer=tokenizer)
    word_ids = tokenizer(words, add_special_tokens=False, return_tensors="pt").input_ids
    assert ptm.config.prefix_length == word_ids.shape[1]
    x = torch.randint(0, 250, (1, 4))
    with torch.no_grad():
        ours = ptm(x).logits
        ref = model(input_ids=torch.cat([word_ids, x], 1)).logits[:, word_ids.shape[1]:]
    assert (ours - ref).abs().max() <= 1e-5


def test_init_from_words_mlp_fit_approaches_activations(tokenizer):
    model = tiny_model("llama")
    cfg = PrefixConfig(reparam="mlp", mlp_hidden=64, init_text="table-to-text:", init_fit_steps=300)
    ptm = PrefixTuningModel(model, cfg, tokenizer=tokenizer)
    table = PrefixTuningModel(model, PrefixConfig(reparam="table", init_text="table-to-text:"), tokenizer=tokenizer)
    fitted, target = ptm.prefix_kv(), table.prefix_kv()
    err = max((fitted.kv[s][0] - target.kv[s][0]).abs().max().item() for s in target.kv)
    scale = max(target.kv[s][0].abs().max().item() for s in target.kv)
    assert err < 0.1 * scale


def test_finalize_drops_mlp_and_keeps_outputs():
    ptm = PrefixTuningModel(tiny_model("opt"), PrefixConfig(prefix_length=3, mlp_hidden=16))
    ids = torch.randint(0, 250, (2, 5))
    with torch.no_grad():
        before = ptm(ids).logits
        ptm.finalize()
        after = ptm(ids).logits
    assert ptm.config.reparam == "table"
    assert not any("mlp" in n for n, _ in ptm.named_parameters())
    assert torch.allclose(before, after, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -3, 10**6, 2.5])
def test_bad_prefix_length(bad):
    with pytest.raises(ValueError, match="prefix_length must be an integer"):
        PrefixTuningModel(tiny_model("gpt2"), PrefixConfig(prefix_length=bad))


def test_unsupported_architecture_refused():
    cfg = transformers.BloomConfig(vocab_size=300, hidden_size=32, n_layer=1, n_head=4)
    with pytest.raises(UnsupportedModelError, match="model_type 'bloom'.*AttentionInterface"):
        PrefixTuningModel(transformers.BloomForCausalLM(cfg), PrefixConfig())


def test_empty_input_and_missing_tokenizer():
    ptm = PrefixTuningModel(tiny_model("gpt2"), PrefixConfig(prefix_length=2))
    with pytest.raises(ValueError, match="input_ids is empty"):
        ptm(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        PrefixTuningModel(tiny_model("gpt2"), PrefixConfig(init_text="hello"))


def _attention_outputs(ptm, ids):
    """Prefix gradients, and each layer's self-attention outputs in the forward pass and during backward."""
    seen = {"forward": {}, "backward": {}}
    phase = ["forward"]

    def hook(layer):
        return lambda module, args, out: seen[phase[0]].setdefault(layer, []).append(out[0].detach().clone())

    handles = [layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(ptm.base.model.layers)]
    ptm.zero_grad()
    loss = ptm(ids, labels=ids).loss
    phase[0] = "backward"
    loss.backward()
    for handle in handles:
        handle.remove()
    return {n: p.grad.clone() for n, p in ptm.named_parameters() if p.requires_grad}, seen


def test_gradient_checkpointing_recomputes_attention_with_the_prefix():
    ids = torch.randint(0, 250, (2, 7))
    plain = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=3, mlp_hidden=16))
    plain.base.train()  # same mode as the checkpointed run; the tiny llama has no dropout
    expected, seen = _attention_outputs(plain, ids)
    assert seen["backward"] == {}  # without checkpointing, backward runs no forward
    ckpt = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=3, mlp_hidden=16))
    ckpt.enable_gradient_checkpointing()
    ckpt.base.train()
    got, seen = _attention_outputs(ckpt, ids)
    layers = range(len(ckpt.base.model.layers))
    # each layer's attention ran once forward and once again in backward (the recomputation), with the same
    # output: the recomputed attention saw the prefix (without it the output would differ)
    assert {i: len(seen["forward"][i]) for i in layers} == {i: len(seen["backward"].get(i, [])) for i in layers} \
        == {i: 1 for i in layers}
    assert all(torch.equal(seen["forward"][i][0], seen["backward"][i][0]) for i in layers)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[n], got[n], atol=1e-6) for n in expected)


def test_checkpointing_enabled_behind_our_back_is_refused():
    ptm = PrefixTuningModel(tiny_model("llama"), PrefixConfig(prefix_length=3))
    ptm.base.activation_checkpointing_enable()
    ptm.base.train()
    with pytest.raises(ValueError, match="enable_gradient_checkpointing"):
        ptm(torch.randint(0, 250, (1, 4)))
