"""Our beam search (finished sources leave the batch) decodes exactly what transformers' generate decodes."""

from __future__ import annotations

import pytest
import torch

from conftest import DECODER_ONLY, PAD, tiny_model
from prefixtune import PrefixConfig, PrefixTuningModel
from prefixtune.beam import supported
from prefixtune.generate import generate_ids

# Many end-of-text tokens make sources finish at different steps, which is what the search must handle.
EOS_SET = list(range(3, 250, 9))


def _prefixes(model, lengths, variant="prefix"):
    out = []
    for i, n in enumerate(lengths):
        ptm = PrefixTuningModel(model, PrefixConfig(prefix_length=n, reparam="table", seed=10 + i, variant=variant))
        with torch.no_grad():
            for enc in ptm.encoders.values():
                enc.table.mul_(3.0)
        out.append(ptm.prefix_kv().detach())
    return out


def _batch(n_rows, seed):
    torch.manual_seed(seed)
    rows = [torch.randint(0, 250, (int(torch.randint(2, 9, ())),)).tolist() for _ in range(n_rows)]
    width = max(len(r) for r in rows)
    ids = torch.full((n_rows, width), PAD)
    mask = torch.zeros(n_rows, width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


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
    assert supported({**kw, "position_ids": None})
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


def test_unsupported_options_use_transformers():
    assert not supported(dict(num_beams=1, max_new_tokens=5))
    assert not supported(dict(num_beams=3, max_new_tokens=5, do_sample=True))
    assert not supported(dict(num_beams=3, max_new_tokens=5, output_scores=True, return_dict_in_generate=True))
