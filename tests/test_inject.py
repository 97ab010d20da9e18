"""Logits with a prefix equal independent references that concatenate prefix keys/values explicitly."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from conftest import ALL_FAMILIES, DECODER_ONLY, ENCODER_DECODER, tiny_model
from prefixtune import PrefixConfig, PrefixTuningModel

TOL = 1e-5

# --- reference 1: transformers' own cache path (decoder-only) -------------------------------------


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_decoder_only_matches_prefix_in_cache(family):
    """[PREFIX; x] through our attention == the prefix handed to the model as L cached tokens."""
    model = tiny_model(family)
    ptm = PrefixTuningModel(model, PrefixConfig(prefix_length=4, reparam="mlp", mlp_hidden=16))
    ids = torch.randint(0, 250, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding in one row
    with torch.no_grad():
        ours = ptm(ids, attention_mask=mask).logits
        prefix = ptm.prefix_kv()
        cache = DynamicCache(config=model.config)
        for (role, layer), (k, v) in sorted(prefix.kv.items(), key=lambda kv: kv[0][1]):
            cache.update(k[None].expand(3, -1, -1, -1).contiguous(), v[None].expand(3, -1, -1, -1).contiguous(), layer)
        full_mask = torch.cat([torch.ones(3, 4, dtype=mask.dtype), mask], dim=1)
        ref = model(input_ids=ids, attention_mask=full_mask, past_key_values=cache).logits
    keep = mask.bool()
    assert (ours - ref)[keep].abs().max().item() <= TOL


# --- reference 2: an explicit eager attention written here, independent of prefixtune -------------

_REF_PREFIX: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """softmax(q [pk; k]^T * scale + [0; bias] + [0; mask]) [pv; v], GQA by repeating kv heads."""
    pk, pv = _REF_PREFIX[id(module)]
    b, h, q_len, d = query.shape
    pk, pv = pk[None].expand(b, -1, -1, -1), pv[None].expand(b, -1, -1, -1)
    key, value = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
    rep = h // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scale = scaling if scaling is not None else 1 / math.sqrt(d)
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scale
    n_prefix = pk.shape[2]
    extra = torch.zeros_like(scores[..., n_prefix:])
    if kwargs.get("position_bias") is not None:
        extra = extra + kwargs["position_bias"]
    if attention_mask is not None:
        extra = extra + attention_mask[..., : key.shape[2] - n_prefix]
    scores = torch.cat([scores[..., :n_prefix], scores[..., n_prefix:] + extra], -1)
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), value)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("reference_concat", _reference_attention)
AttentionMaskInterface.register("reference_concat", eager_mask)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_all_attentions_match_explicit_concatenation(family):
    """Encoder self-, decoder self- and cross-attention all see exactly their own prefix."""
    ptm = PrefixTuningModel(tiny_model(family), PrefixConfig(prefix_length=3, reparam="table"))
    ids = torch.randint(0, 250, (2, 7))
    dec = torch.randint(0, 250, (2, 5))
    kwargs = {"decoder_input_ids": dec} if family in ENCODER_DECODER else {}
    with torch.no_grad():
        ours = ptm(ids, **kwargs).logits
        prefix = ptm.prefix_kv()
    # The reference model: same weights, our attention replaced by the one above, positions as [PREFIX; x].
    ref_model = tiny_model(family, attn="eager")
    ref_model.set_attn_implementation("reference_concat")
    ours_modules = {name: m for name, m in ptm.base.named_modules() if hasattr(m, "_prefixtune_slot")}
    assert ours_modules, "no attention module was tagged"
    for name, module in ref_model.named_modules():
        if name in ours_modules:
            _REF_PREFIX[id(module)] = prefix.kv[ours_modules[name]._prefixtune_slot]
    roles = {m._prefixtune_slot[0] for m in ours_modules.values()}
    assert roles == ({"encoder", "self", "cross"} if family in ENCODER_DECODER else {"self"})
    if family in DECODER_ONLY:
        kwargs["position_ids"] = torch.arange(3, 3 + ids.shape[1])[None].expand(2, -1)
    with torch.no_grad():
        ref = ref_model(input_ids=ids, **kwargs).logits
    assert (ours - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("family", ["llama", "bart", "t5"])
def test_each_role_changes_output(family):
    """Zeroing one role's prefix contribution changes logits: every role is really used."""
    ptm = PrefixTuningModel(tiny_model(family), PrefixConfig(prefix_length=3, reparam="table"))
    ids = torch.randint(0, 250, (1, 6))
    kwargs = {"decoder_input_ids": ids[:, :4]} if family in ENCODER_DECODER else {}
    with torch.no_grad():
        full = ptm(ids, **kwargs).logits
        for role, enc in ptm.encoders.items():
            saved = enc.table.data.clone()
            enc.table.data.mul_(5.0)
            changed = ptm(ids, **kwargs).logits
            enc.table.data.copy_(saved)
            assert (changed - full).abs().max() > 1e-5, role  # float noise is ~1e-7


def test_base_model_unchanged_without_active_prefix():
    model = tiny_model("llama")
    ids = torch.randint(0, 250, (2, 6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        PrefixTuningModel(model, PrefixConfig(prefix_length=2))
        after = model(input_ids=ids).logits
    assert torch.equal(before, after) or (before - after).abs().max() < 1e-6


def test_eager_base_attention_also_supported():
    sdpa = PrefixTuningModel(tiny_model("gpt2", attn="sdpa"), PrefixConfig(prefix_length=3, reparam="table"))
    eager = PrefixTuningModel(tiny_model("gpt2", attn="eager"), PrefixConfig(prefix_length=3, reparam="table"))
    ids = torch.randint(0, 250, (2, 6))
    with torch.no_grad():
        assert (sdpa(ids).logits - eager(ids).logits).abs().max() <= TOL


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_infix_matches_infix_placed_in_cache(family):
    """[x; INFIX; y]: the source before the boundary ignores the infix; from the boundary on, logits equal
    running x, then the infix as L cached tokens, then the rest at positions shifted by L."""
    model = tiny_model(family)
    ptm = PrefixTuningModel(model, PrefixConfig(prefix_length=3, reparam="table", variant="infix"))
    ids = torch.randint(0, 250, (1, 8))
    b = 5  # index of the separator
    with torch.no_grad():
        ours = ptm(ids, infix_boundary=torch.tensor([b])).logits
        infix = ptm.prefix_kv()
        cache = DynamicCache(config=model.config)
        head = model(input_ids=ids[:, :b], past_key_values=cache, use_cache=True).logits
        for (_, layer), (k, v) in sorted(infix.kv.items(), key=lambda kv: kv[0][1]):
            cache.update(k[None], v[None], layer)
        tail = model(input_ids=ids[:, b:], past_key_values=cache,
                     position_ids=torch.arange(b + 3, 8 + 3)[None]).logits
    assert (ours[:, :b] - head).abs().max() <= TOL
    assert (ours[:, b:] - tail).abs().max() <= TOL
