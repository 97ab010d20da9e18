"""The engine: requests of any tasks and options join and leave a running batch and decode as alone."""

from __future__ import annotations

import pytest
import torch

from conftest import DECODER_ONLY, PAD, tiny_model
from decode_helpers import random_prefixes
from prefixtune.decoding import Engine, Request, generate_ids

GREEDY = dict(max_new_tokens=7, min_new_tokens=2, pad_token_id=PAD, eos_token_id=[3, 7, 11])
BEAM = dict(GREEDY, num_beams=3, length_penalty=1.0, early_stopping=True)
SAMPLE = dict(GREEDY, do_sample=True, temperature=1.3)


def _alone(model, request: Request) -> list[list[int]]:
    seeds = None if request.seed is None else [request.seed]
    out = generate_ids(model, [request.prefix], torch.tensor([request.prompt]), seeds=seeds, **request.kwargs)
    return [[t for t in row[len(request.prompt):] if t != PAD] for row in out.tolist()]


def _trim(outputs):  # generate_ids pads with PAD after the end; the engine stops at the end
    return [[t for t in seq if t != PAD] for seq in outputs]


@pytest.mark.parametrize("family", DECODER_ONLY)
def test_requests_joining_a_running_batch_decode_as_alone(family):
    model = tiny_model(family)
    p1, p2, p3 = random_prefixes(model, [2, 6, 3], seed=4)
    (infix,) = random_prefixes(model, [2], seed=9, variant="infix")
    first = [Request([5, 6, 7], p1, GREEDY), Request([8, 9, 10, 11, 12, 13], p2, BEAM),
             Request([14, 15], None, SAMPLE, seed=5), Request([32, 33, 34], infix, GREEDY)]
    later = [Request([16, 17, 18, 19, 20, 21, 22, 23, 24], p3, GREEDY), Request([25, 26], infix, GREEDY),
             Request([27, 28, 29, 30], p1, BEAM), Request([31], p2, SAMPLE, seed=6)]
    engine = Engine(model)
    engine.add(first)
    engine.step()
    engine.step()
    engine.add(later)  # longer prompts and a longer prefix than the running lanes, a new beam cohort
    assert engine.lanes > 6
    engine.run()
    for r in first + later:
        assert _trim(r.outputs) == _alone(model, r), r.prompt


def test_cancelled_requests_leave_and_the_others_continue():
    model = tiny_model("llama")
    p1, p2 = random_prefixes(model, [2, 4])
    keep = [Request([5, 6, 7], p1, GREEDY), Request([8, 9], p2, BEAM)]
    drop = [Request([10, 11, 12], p2, GREEDY), Request([13, 14, 15], p1, BEAM)]
    done = []
    for r in keep + drop:
        r.on_done = done.append
    engine = Engine(model)
    engine.add(keep + drop)
    engine.step()
    for r in drop:
        r.cancelled = True
    engine.step()
    assert engine.lanes <= 1 + 3  # only the kept requests' lanes are left
    engine.run()
    assert done == [r for r in done if r in keep] and set(map(id, done)) == set(map(id, keep))
    for r in keep:
        assert _trim(r.outputs) == _alone(model, r)


def test_streaming_callbacks_see_every_token_in_order():
    model = tiny_model("qwen2")
    (p,) = random_prefixes(model, [3])
    seen = []
    r = Request([5, 6, 7], p, dict(GREEDY, eos_token_id=None), on_token=lambda req, t: seen.append(t))
    engine = Engine(model)
    engine.add([r])
    engine.run()
    assert seen == r.outputs[0] == r.tokens and len(seen) == GREEDY["max_new_tokens"]


def test_engine_refuses_models_it_cannot_hold():
    with pytest.raises(ValueError, match="decoder-only"):
        Engine(tiny_model("bart"))
