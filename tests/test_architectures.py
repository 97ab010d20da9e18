"""Every proven architecture (tests/architectures.py) on a tiny random model, and every refused feature.

For each model type: the prefix path equals the prefix given as cached past tokens (decoder-only; encoder-
decoder models against explicit concatenation, since their positions and T5's bias do not count cached
tokens), every greedy decoding step equals a cache-free prefixed pass, a mixed-prefix batch generates
what each row generates alone (greedy and beam), and a saved prefix reloads to the same logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from transformers import DynamicCache

from architectures import ARCHITECTURES, WINDOW, build, readme_block, readme_list, README
from conftest import PAD, VOCAB
from decode_helpers import left_pad, random_prefixes
from prefixtune import PrefixConfig, PrefixTuningModel, _compat
from prefixtune._compat import UnsupportedModelError
from prefixtune.decoding import generate_ids
from test_inject import _REF_PREFIX  # registers the "reference_concat" attention it reads

TYPES = list(ARCHITECTURES)
DECODER_ONLY = [t for t in TYPES if not ARCHITECTURES[t].config().is_encoder_decoder]
TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table_prefix(model, length: int = 4, **kwargs) -> PrefixTuningModel:
    """A prefix of random keys/values large enough to change every output."""
    ptm = PrefixTuningModel(model, PrefixConfig(prefix_length=length, reparam="table", **kwargs))
    with torch.no_grad():
        for enc in ptm.encoders.values():
            enc.table.mul_(2.0)
    return ptm


def _cache_reference(reference, prefix, ids, mask) -> torch.Tensor:
    """Logits of the untouched model with the prefix handed over as L cached tokens of every row."""
    b, n = ids.shape[0], prefix.length
    cache = DynamicCache(config=reference.config)
    for (_, layer), (k, v) in sorted(prefix.kv.items(), key=lambda kv: kv[0][1]):
        cache.update(k[None].expand(b, -1, -1, -1).contiguous(), v[None].expand(b, -1, -1, -1).contiguous(), layer)
    full_mask = torch.cat([torch.ones(b, n, dtype=mask.dtype), mask], dim=1)
    return reference(input_ids=ids, attention_mask=full_mask, past_key_values=cache).logits


def _concat_reference(reference, ptm, ids, dec) -> torch.Tensor:
    """Logits of the untouched encoder-decoder with every attention concatenating its prefix explicitly."""
    reference.set_attn_implementation("reference_concat")
    prefix = ptm.prefix_kv()
    ours = {name: m._prefixtune_slot for name, m in ptm.base.named_modules() if hasattr(m, "_prefixtune_slot")}
    for name, module in reference.named_modules():
        if name in ours:
            _REF_PREFIX[id(module)] = prefix.kv[ours[name]]
    return reference(input_ids=ids, decoder_input_ids=dec).logits


@pytest.mark.parametrize("length", [5, 9])
@pytest.mark.parametrize("model_type", TYPES)
def test_prefix_equals_reference(model_type, length):
    """5 tokens: a sliding window cuts only the prefix; 9: the real tokens too."""
    model = build(model_type)
    reference = copy.deepcopy(model)
    ptm = _table_prefix(model)
    torch.manual_seed(1)
    ids = torch.randint(0, 250, (3, length))
    dec = {"decoder_input_ids": torch.randint(0, 250, (3, 5))} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        base = reference(input_ids=ids, **dec).logits
        if dec:
            ours, ref = ptm(ids, **dec).logits, _concat_reference(reference, ptm, ids, dec["decoder_input_ids"])
            keep = torch.ones(ours.shape[:2], dtype=torch.bool)
        else:
            mask = torch.ones_like(ids)
            mask[1, length - 2:] = 0  # right padding in one row
            ours, ref = ptm(ids, attention_mask=mask).logits, _cache_reference(reference, ptm.prefix_kv(), ids, mask)
            keep = mask.bool()
    assert (ours - base)[keep].abs().max() > 1e-2, "the prefix changes nothing: the comparison would prove nothing"
    assert (ours - ref)[keep].abs().max() <= TOL


@pytest.mark.parametrize("model_type", DECODER_ONLY)
def test_every_greedy_step_equals_a_cache_free_pass(model_type):
    """Also past the sliding window, where transformers' sliding cache drops the oldest keys."""
    model = build(model_type)
    ptm = _table_prefix(model)
    ids = torch.randint(0, 250, (1, 5))
    out = ptm.generate(ids, max_new_tokens=5, do_sample=False, output_logits=True, return_dict_in_generate=True,
                       pad_token_id=PAD, eos_token_id=None)
    seq = out.sequences[0]
    with torch.no_grad():
        for t, step in enumerate(out.logits):
            alone = ptm(seq[None, : ids.shape[1] + t]).logits[0, -1]
            assert (step[0] - alone).abs().max() < TOL, f"step {t}"


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("model_type", TYPES)
def test_mixed_batch_rows_equal_alone(model_type, num_beams):
    model = build(model_type)
    p1, p2 = random_prefixes(model, [2, 5])
    prefixes = [p1, p2, None]
    rows = [[5, 9, 40, 2], [7, 8, 9, 10, 11, 12, 13], [100, 3, 60]]
    ids, mask = left_pad(rows)
    kw = dict(max_new_tokens=4, num_beams=num_beams, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    new = slice(None) if model.config.is_encoder_decoder else slice(ids.shape[1], None)
    batch = generate_ids(model, prefixes, ids, mask, **kw)[:, new]
    for i, (row, prefix) in enumerate(zip(rows, prefixes)):
        alone_ids = torch.tensor([row])
        alone = generate_ids(model, [prefix], alone_ids, **kw)
        alone = alone if model.config.is_encoder_decoder else alone[:, alone_ids.shape[1]:]
        assert batch[i].tolist() == alone[0].tolist(), f"row {i} differs in the batch"


@pytest.mark.parametrize("model_type", TYPES)
def test_save_load_round_trip(model_type, tmp_path):
    model = build(model_type)
    ptm = _table_prefix(model, length=3, seed=4)
    ptm.save_pretrained(tmp_path)
    loaded = PrefixTuningModel.from_pretrained(build(model_type), tmp_path)
    ids = torch.randint(0, 250, (2, 6))
    extra = {"decoder_input_ids": ids[:, :3]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        assert torch.allclose(ptm(ids, **extra).logits, loaded(ids, **extra).logits, atol=1e-6)


# --- features that meet a prefix -------------------------------------------------------------------------

def test_sliding_window_cuts_the_prefix_in_these_tests():
    """The sliding-window models above run windows shorter than their sequences, so prefix slots really
    leave the window; a window that spans the prefix and every key masks nothing."""
    assert WINDOW < 4 + 9
    sliding = [t for t in DECODER_ONLY if getattr(ARCHITECTURES[t].config(), "sliding_window", None)]
    assert {"mistral", "mixtral", "qwen3", "gemma2", "gemma3_text", "starcoder2"} <= set(sliding)
    mask = torch.ones(1, 4, dtype=torch.bool)
    kwargs = {"sliding_window": WINDOW, "position_ids": torch.arange(4, 13)[None]}  # 9 tokens after the prefix
    inside = _compat.prefix_in_window(torch.nn.Module(), kwargs, mask, None, 9)[0, 0]
    assert inside[0].all() and inside[2].tolist() == [False, True, True, True] and not inside[-1].any()
    assert _compat.prefix_in_window(torch.nn.Module(), {**kwargs, "sliding_window": 13}, mask, None, 9) is None
    with pytest.raises(UnsupportedModelError, match="gives its attention no position_ids"):
        _compat.prefix_in_window(torch.nn.Module(), {"sliding_window": WINDOW}, mask, None, 9)


def test_infix_refused_where_a_window_can_cut_it():
    ptm = _table_prefix(build("mistral"), variant="infix")
    ids = torch.randint(0, 250, (1, 9))
    with pytest.raises(UnsupportedModelError, match="infix ablation with a sliding window of 6 positions"):
        ptm(ids, infix_boundary=torch.tensor([4]))
    ptm(ids[:, :2], infix_boundary=torch.tensor([1]))  # a window that cannot cut it is fine


def test_per_layer_head_counts():
    """A Llama whose second layer has 2 query heads and 1 key/value head (the first: 6 and 2)."""
    model = build("llama")
    other = copy.copy(model.config)
    other.num_attention_heads, other.num_key_value_heads, other.head_dim = 2, 1, model.config.head_dim
    attention = transformers.models.llama.modeling_llama.LlamaAttention(other, layer_idx=1)
    attention.config = model.config  # shapes come from `other`; the attention implementation from the model
    model.model.layers[1].self_attn = attention
    reference = copy.deepcopy(model)
    ptm = _table_prefix(model)
    assert ptm.shapes[("self", 0)] == (2, 8) and ptm.shapes[("self", 1)] == (1, 8)
    ids = torch.randint(0, 250, (2, 7))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours, ref = ptm(ids).logits, _cache_reference(reference, ptm.prefix_kv(), ids, mask)
    assert (ours - ref).abs().max() <= TOL


@pytest.mark.parametrize("variant", [dict(new_decoder_architecture=True, num_kv_heads=2), dict(multi_query=False)])
def test_other_falcon_layouts(variant):
    """The routed Falcon attention, for grouped key/value heads and for one key/value head per head."""
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       pad_token_id=PAD, **variant)
    model = transformers.FalconForCausalLM(config).eval()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 250, (2, 7))
    with torch.no_grad():
        before = reference(input_ids=ids).logits
        ptm = _table_prefix(model)
        assert (model(input_ids=ids).logits - before).abs().max() <= 1e-5, "routing changed the model without a prefix"
        ours, ref = ptm(ids).logits, _cache_reference(reference, ptm.prefix_kv(), ids, torch.ones_like(ids))
    assert (ours - ref).abs().max() <= TOL


@pytest.mark.parametrize("model_type", ["falcon", "gptj"])
def test_routed_models_unchanged_without_prefix(model_type):
    model = build(model_type)
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 250, (2, 7))
    _table_prefix(model)
    with torch.no_grad():
        assert (model(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() <= 1e-5


def _tiny(config_class, **kwargs):
    return config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, **kwargs)


@pytest.mark.parametrize("config, named", [
    (lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       alibi=True), "ALiBi position biases"),
    (lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
     "BloomForCausalLM computes attention inside its own modules"),
    (lambda: transformers.SwitchTransformersConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4),
     "mixture-of-experts routing with an expert capacity"),
    (lambda: _tiny(transformers.Llama4TextConfig), "chunked local attention"),
    (lambda: _tiny(transformers.Qwen3NextConfig, layer_types=["linear_attention", "full_attention"]),
     r"layers of type \['linear_attention'\]"),
])
def test_refused_features_are_named(config, named, tmp_path):
    with pytest.raises(UnsupportedModelError, match=named):
        _compat.check_config(config())


def test_bidirectional_and_partly_attention_models_refused():
    bert = transformers.BertLMHeadModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=4, intermediate_size=64))
    with pytest.raises(UnsupportedModelError, match="bidirectional self-attention.*is_decoder=True"):
        PrefixTuningModel(bert, PrefixConfig())
    model = build("llama")
    model.model.layers[1].self_attn = type("Mixer", (torch.nn.Module,), {})()  # a layer that is not attention
    with pytest.raises(UnsupportedModelError, match="2 layers but 1 attention modules"):
        _compat.check_supported(model)


def test_unknown_logit_transform_refused(monkeypatch):
    model = build("granite")
    monkeypatch.setattr(_compat, "_logit_transform", lambda config: None)
    with pytest.raises(UnsupportedModelError, match="changes its logits after the output projection"):
        PrefixTuningModel(model, PrefixConfig())


def test_readme_lists_exactly_the_proven_types():
    assert readme_block(README.read_text()) == readme_list(), "run `python tests/architectures.py` to update README.md"
    assert len(ARCHITECTURES) >= 25
