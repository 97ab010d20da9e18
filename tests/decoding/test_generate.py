"""Mixed-prefix batches generate what each row generates alone; every decoding step sees the prefix."""

from __future__ import annotations

import pytest
import torch

from conftest import ALL_FAMILIES, DECODER_ONLY, ENCODER_DECODER, PAD, tiny_model
from decode_helpers import left_pad, random_prefixes
from prefixtune import GenerateConfig, MultiPrefixModel, PrefixConfig, PrefixTuningModel
from prefixtune.config import TextFormat
from prefixtune.decoding import generate_ids, generate_texts


_prefixes = random_prefixes
_left_pad = left_pad


def _new_tokens(model, out, ids):
    return out if model.config.is_encoder_decoder else out[:, ids.shape[1]:]


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_mixed_batch_rows_equal_alone(family, num_beams):
    model = tiny_model(family)
    p1, p2 = _prefixes(model, [2, 5])
    prefixes = [p1, p2, None, p2]  # different tasks, different lengths, one without prefix
    torch.manual_seed(1)
    rows = [torch.randint(0, 250, (n,)).tolist() for n in (4, 7, 5, 2)]
    ids, mask = _left_pad(rows)
    kw = dict(max_new_tokens=6, num_beams=num_beams, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    batch = _new_tokens(model, generate_ids(model, prefixes, ids, mask, **kw), ids)
    for i, (row, prefix) in enumerate(zip(rows, prefixes)):
        alone_ids = torch.tensor([row])
        alone = _new_tokens(model, generate_ids(model, [prefix], alone_ids, **kw), alone_ids)
        assert batch[i].tolist() == alone[0].tolist(), f"row {i} differs in the batch"


@pytest.mark.parametrize("family", DECODER_ONLY + ENCODER_DECODER)
def test_every_decoding_step_sees_the_prefix(family):
    """generate's logits at every step equal a cache-free prefixed forward pass, and differ from the base's."""
    model = tiny_model(family)
    ptm = PrefixTuningModel(model, PrefixConfig(prefix_length=4, reparam="table"))
    with torch.no_grad():
        for enc in ptm.encoders.values():
            enc.table.mul_(3.0)
    ids = torch.randint(0, 250, (1, 5))
    out = ptm.generate(ids, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True,
                       pad_token_id=PAD, eos_token_id=None)
    enc_dec = model.config.is_encoder_decoder
    seq = out.sequences[0]
    for t, step_logits in enumerate(out.logits):
        with torch.no_grad():
            if enc_dec:
                dec = seq[None, : t + 1]
                with_prefix = ptm(ids, decoder_input_ids=dec).logits[0, -1]
                without = model(input_ids=ids, decoder_input_ids=dec).logits[0, -1]
            else:
                ctx = seq[None, : ids.shape[1] + t]
                with_prefix = ptm(ctx).logits[0, -1]
                without = model(input_ids=ctx).logits[0, -1]
        assert (step_logits[0] - with_prefix).abs().max() < 1e-4, f"step {t} did not use the prefix as trained"
        assert (step_logits[0] - without).abs().max() > 1e-3, f"step {t} looks like the base model"


def test_multi_prefix_model_texts(tokenizer):
    model = tiny_model("llama")
    p1, p2 = _prefixes(model, [3, 6])
    multi = MultiPrefixModel(model, tokenizer)
    multi.add("a", p1)
    multi.add("b", p2, TextFormat(source="{input} =>{eos}"))
    cfg = GenerateConfig(num_beams=2, max_new_tokens=5, min_new_tokens=0, batch_size=3)
    inputs = ["name[x]", "a longer input text", "hi", "mid size"]
    tasks = ["a", "b", None, "a"]
    mixed = multi.generate(inputs, tasks, cfg)
    alone = [multi.generate([x], [t], cfg)[0] for x, t in zip(inputs, tasks)]
    assert mixed == alone
    assert set(multi.tasks()) == {"a", "b"}
    with pytest.raises(KeyError, match="unknown task 'c'"):
        multi.generate(["x"], ["c"], cfg)
    multi.remove("a")
    with pytest.raises(KeyError, match="loaded tasks: \\['b'\\]"):
        multi.generate(["x"], ["a"], cfg)


def test_generate_texts_bad_input(tokenizer):
    model = tiny_model("gpt2")
    (p,) = _prefixes(model, [2])
    with pytest.raises(ValueError, match="empty input text at position"):
        generate_texts(model, tokenizer, [p, p], ["ok", "  "], [TextFormat()] * 2)
    with pytest.raises(ValueError, match="2 sources, 1 prefixes"):
        generate_texts(model, tokenizer, [p], ["a", "b"], [TextFormat()] * 2)
    with pytest.raises(ValueError, match="num_beams must be >= 1"):
        generate_texts(model, tokenizer, [p], ["a"], [TextFormat()], GenerateConfig(num_beams=0))
    with pytest.raises(ValueError, match="input_ids is empty"):
        generate_ids(model, [p], torch.zeros(1, 0, dtype=torch.long))


def test_sampling_is_seeded(tokenizer):
    model = tiny_model("qwen2")
    (p,) = _prefixes(model, [3])
    cfg = GenerateConfig(num_beams=1, do_sample=True, temperature=1.5, max_new_tokens=8, min_new_tokens=0, seed=7)
    a = generate_texts(model, tokenizer, [p, p], ["abc", "abc"], [TextFormat()] * 2, cfg)
    b = generate_texts(model, tokenizer, [p, p], ["abc", "abc"], [TextFormat()] * 2, cfg)
    assert a == b


@pytest.mark.parametrize("num_beams", [1, 2])
def test_infix_rows_mixed_with_prefix_rows(num_beams):
    model = tiny_model("llama")
    infix_model = PrefixTuningModel(model, PrefixConfig(prefix_length=3, reparam="table", variant="infix", seed=5))
    with torch.no_grad():
        infix_model.encoders["self"].table.mul_(3.0)
    infix = infix_model.prefix_kv().detach()
    assert infix.infix
    (p,) = _prefixes(model, [4])
    rows = [[5, 6, 7], [8, 9, 10, 11, 12], [3, 4]]
    ids, mask = _left_pad(rows)
    prefixes = [infix, p, infix]
    kw = dict(max_new_tokens=5, num_beams=num_beams, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    batch = generate_ids(model, prefixes, ids, mask, **kw)[:, ids.shape[1]:]
    for i, (row, prefix) in enumerate(zip(rows, prefixes)):
        alone = generate_ids(model, [prefix], torch.tensor([row]), **kw)[:, len(row):]
        assert batch[i].tolist() == alone[0].tolist()
    # the generated continuation really depends on the infix
    plain = generate_ids(model, [None], torch.tensor([rows[0]]), **kw)[:, len(rows[0]):]
    first = generate_ids(model, [infix], torch.tensor([rows[0]]), **kw)[:, len(rows[0]):]
    assert plain.tolist() != first.tolist()


def test_generate_config_bf16_values():
    assert GenerateConfig(bf16=True).validate().bf16 == "on"
    assert GenerateConfig(bf16=False).validate().bf16 == "off"
    assert GenerateConfig(bf16="auto").validate().bf16 == "auto"
    with pytest.raises(ValueError, match="bf16 must be auto, on or off, got 'yes'"):
        GenerateConfig(bf16="yes").validate()


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_engine_returns_what_transformers_returns(family):
    """Several returned beams per source: the same tensor as transformers' generate, fills included."""
    model = tiny_model(family)
    p1, p2 = _prefixes(model, [2, 5])
    torch.manual_seed(2)
    rows = [torch.randint(0, 250, (n,)).tolist() for n in (4, 7, 5)]
    ids, mask = _left_pad(rows)
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, pad_token_id=PAD, eos_token_id=[3, 7, 11])
    fast = generate_ids(model, [p1, p2, None], ids, mask, **kw)
    slow = generate_ids(model, [p1, p2, None], ids, mask, prefill_once=False, **kw)
    assert fast.tolist() == slow.tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sampled_rows_do_not_depend_on_their_batch(family):
    """Each row samples from its own seeded generator: in a mixed batch as alone."""
    model = tiny_model(family)
    p1, p2 = _prefixes(model, [2, 5])
    rows = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    ids, mask = _left_pad(rows)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=0, pad_token_id=PAD, eos_token_id=None)
    batch = generate_ids(model, [p1, p2, None], ids, mask, seeds=[1, 2, 3], **kw)[:, ids.shape[1]:]
    for i, (row, p) in enumerate(zip(rows, [p1, p2, None])):
        alone = generate_ids(model, [p], torch.tensor([row]), seeds=[i + 1], **kw)[:, len(row):]
        assert batch[i].tolist() == alone[0].tolist()
    other = generate_ids(model, [p1], torch.tensor([rows[0]]), seeds=[99], **kw)[:, len(rows[0]):]
    assert other[0].tolist() != batch[0].tolist()  # the seed matters


def test_engine_starts_from_a_cache_holding_prefix_and_prompt():
    """A joining cohort: prefix in front of each layer's keys, real length = prompt - 1, copied per beam."""
    from prefixtune.decoding import Engine, Request
    from prefixtune.decoding.cache import PrefixedCacheLayer

    model = tiny_model("llama")
    p1, p2 = _prefixes(model, [2, 5])
    kw = dict(max_new_tokens=4, num_beams=3, pad_token_id=PAD, eos_token_id=None)
    engine = Engine(model)
    engine.add([Request([5, 6, 7, 8], p1, kw), Request([9, 10, 11], p2, kw)])
    cache = engine.cache
    assert all(isinstance(layer, PrefixedCacheLayer) for layer in cache.layers)
    assert cache.get_seq_length() == 3 and engine.mask.shape == (6, 4)
    key = cache.layers[0].keys
    assert key.shape[0] == 6 and key.shape[2] == 5 + 3
    assert torch.equal(key[3:6, :, :5], p2.kv[("self", 0)][0][None].expand(3, -1, -1, -1))
    assert engine.prefix_mask.tolist() == [[True, True, False, False, False]] * 3 + [[True] * 5] * 3
