"""Our beam search (finished sources leave the batch) decodes exactly what transformers' generate decodes."""

from __future__ import annotations

import pytest
import torch

from conftest import DECODER_ONLY, PAD, tiny_model  # noqa: F401
from decode_helpers import left_pad, random_prefixes
from prefixtune.decoding import generate_ids, supported

# Many end-of-text tokens make sources finish at different steps, which is what the search must handle.
EOS_SET = list(range(3, 250, 9))


def _prefixes(model, lengths, variant="prefix"):
    return random_prefixes(model, lengths, seed=10, variant=variant)


def _batch(n_rows, seed):
    torch.manual_seed(seed)
    rows = [torch.randint(0, 250, (int(torch.randint(2, 9, ())),)).tolist() for _ in range(n_rows)]
    return left_pad(rows)


@pytest.mark.parametrize("family", DECODER_ONLY)
@pytest.mark.parametrize("early_stopping", [True, False])
def test_beam_search_equals_transformers(family, early_stopping):
    model = tiny_model(family)
    p1, p2 = _prefixes(model, [2, 5])
    (infix,) = _prefixes(model, [3], variant="infix")
    ids, mask = _batch(6, seed=4)
    prefixes = [p1, p2, None, infix, p2, p1]  # tasks, lengths, no prefix and an infix in one batch
    kw = dict(max_new_tokens=12, min_new_tokens=1, num_beams=3, do_sample=False, early_stopping=early_stopping,
              length_penalty=1.0, pad_token_id=PAD, eos_token_id=EOS_SET)
    assert supported(kw)
    ours = generate_ids(model, prefixes, ids, mask, **kw)
    theirs = generate_ids(model, prefixes, ids, mask, prefill_once=False, **kw)
    assert ours.tolist() == theirs.tolist()


def test_finished_sources_leave_the_batch():
    model = tiny_model("llama")
    (p,) = _prefixes(model, [3])
    ids, mask = _batch(8, seed=5)
    rows_seen = []
    hook = model.register_forward_hook(lambda mod, args, kwargs, out: rows_seen.append(kwargs["input_ids"].shape[0]),
                                       with_kwargs=True)
    kw = dict(max_new_tokens=16, num_beams=2, do_sample=False, early_stopping=True, pad_token_id=PAD,
              eos_token_id=EOS_SET, num_return_sequences=2)
    try:
        ours = generate_ids(model, [p] * 8, ids, mask, **kw)
    finally:
        hook.remove()
    theirs = generate_ids(model, [p] * 8, ids, mask, prefill_once=False, **kw)
    assert ours.tolist() == theirs.tolist()
    assert rows_seen[0] == 16 and min(rows_seen) < 16, rows_seen  # sources finished early stopped running
    assert rows_seen == sorted(rows_seen, reverse=True)


def test_options_the_engine_does_not_implement_go_to_transformers():
    assert supported(dict(num_beams=1, max_new_tokens=5))
    assert supported(dict(num_beams=3, max_new_tokens=5, num_return_sequences=2))
    assert not supported(dict(num_beams=3, max_new_tokens=5, do_sample=True))
    assert not supported(dict(num_beams=3, max_new_tokens=5, output_scores=True, return_dict_in_generate=True))
    assert not supported(dict(num_beams=1, max_new_tokens=5, num_return_sequences=2))
    assert not supported(dict(num_beams=3))
