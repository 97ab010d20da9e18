"""cache.PrefixedCacheLayer against a plain-tensor reference of the same operations.

The reference keeps [prefix; real] keys/values as ordinary tensors and applies each operation the way
transformers' DynamicLayer does (cat on update, index_select on reorder, repeat_interleave, indexing):
the buffered layer, with its in-place writes and partial reorders, must hold exactly the same numbers.
"""

from __future__ import annotations

import pytest
import torch

from prefixtune.decoding.cache import PrefixedCacheLayer, _HEADROOM

H, D, L = 2, 4, 3  # key/value heads, head dim, prefix length


class Reference:
    def __init__(self, key, value):
        self.k, self.v = key.clone(), value.clone()

    def update(self, k, v):
        self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)

    def rows(self, index):
        self.k, self.v = self.k[index], self.v[index]

    def repeat(self, r):
        self.k, self.v = self.k.repeat_interleave(r, 0), self.v.repeat_interleave(r, 0)


def _kv(rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, H, n, D, generator=g), torch.randn(rows, H, n, D, generator=g)


def _same(layer: PrefixedCacheLayer, ref: Reference):
    assert torch.equal(layer.keys, ref.k) and torch.equal(layer.values, ref.v)
    assert layer.get_seq_length() == ref.k.shape[2] - L


def _within_groups(rows: int, group: int, g: torch.Generator) -> torch.Tensor:
    """A beam-style reorder: each row takes a (random) row of its own group."""
    base = torch.arange(rows) // group * group
    return base + torch.randint(0, group, (rows,), generator=g)


def _beam_start(sources: int, beams: int, prompt: int):
    """Both caches after a prompt pass and its repetition per beam, as generate.prompt_cache leaves them."""
    layer, ref = PrefixedCacheLayer(*_kv(sources, L, 0)), Reference(*_kv(sources, L, 0))
    layer.update(*_kv(sources, prompt, 1)), ref.update(*_kv(sources, prompt, 1))
    layer.batch_repeat_interleave(beams), ref.repeat(beams)
    return layer, ref


def _step_and_reorder(layer, ref, beams: int, seed: int, g: torch.Generator) -> None:
    """One decoding step's token, then a beam reorder inside each source."""
    rows = ref.k.shape[0]
    k, v = _kv(rows, 1, seed)
    layer.update(k, v), ref.update(k, v)
    index = _within_groups(rows, beams, g)
    layer.reorder_cache(index), ref.rows(index)
    _same(layer, ref)


def test_updates_past_capacity_keep_every_token():
    layer, ref = PrefixedCacheLayer(*_kv(2, L, 0)), Reference(*_kv(2, L, 0))
    assert layer.get_seq_length() == 0
    ref.update(*_kv(2, 7, 1)), layer.update(*_kv(2, 7, 1))  # a prompt
    _same(layer, ref)
    for step in range(2 * _HEADROOM + 5):  # forces the buffer to grow more than once
        k, v = _kv(2, 1, 10 + step)
        out_k, out_v = layer.update(k, v)
        ref.update(k, v)
        assert torch.equal(out_k, ref.k) and torch.equal(out_v, ref.v)
    _same(layer, ref)


def test_beam_reorders_within_repeated_rows_equal_full_row_moves():
    """Beam search: prompt, repeat per beam, then steps each followed by a reorder inside each source."""
    beams = 4
    layer, ref = _beam_start(3, beams, 5)
    g = torch.Generator().manual_seed(0)
    for step in range(12):
        _step_and_reorder(layer, ref, beams, 100 + step, g)


def test_finished_sources_leave_and_reorders_stay_correct():
    beams = 3
    layer, ref = _beam_start(4, beams, 4)
    g = torch.Generator().manual_seed(1)
    keep_sources = torch.tensor([0, 2, 3])  # source 1 is done: its rows leave, whole groups stay
    keep = (keep_sources[:, None] * beams + torch.arange(beams)).reshape(-1)
    for step, event in enumerate(["step", "drop", "step", "step"]):
        if event == "drop":
            layer.batch_select_indices(keep), ref.rows(keep)
            assert layer._group == beams  # whole groups: the shared prompt part is still skipped
        _step_and_reorder(layer, ref, beams, 200 + step, g)


def test_reorder_across_sources_and_partial_selection_fall_back_to_whole_rows():
    layer, ref = _beam_start(2, 3, 4)
    layer.update(*_kv(6, 1, 2)), ref.update(*_kv(6, 1, 2))
    across = torch.tensor([5, 4, 3, 2, 1, 0])  # rows move between sources
    layer.reorder_cache(across), ref.rows(across)
    _same(layer, ref)
    assert layer._group == 1
    layer.batch_repeat_interleave(2), ref.repeat(2)  # now 12 rows in pairs
    part = torch.tensor([1, 2, 5, 6])  # not whole pairs
    layer.batch_select_indices(part), ref.rows(part)
    assert layer._group == 1
    layer.update(*_kv(4, 1, 3)), ref.update(*_kv(4, 1, 3))
    index = torch.tensor([1, 0, 3, 2])
    layer.reorder_cache(index), ref.rows(index)
    _same(layer, ref)


def test_reorder_before_any_real_token_moves_the_prefix_with_its_row():
    layer, ref = PrefixedCacheLayer(*_kv(3, L, 0)), Reference(*_kv(3, L, 0))
    index = torch.tensor([2, 0, 1])
    layer.reorder_cache(index), ref.rows(index)
    _same(layer, ref)
    layer.update(*_kv(3, 2, 1)), ref.update(*_kv(3, 2, 1))
    _same(layer, ref)


def test_prefix_tensors_given_are_never_written():
    key, value = _kv(2, L, 0)
    kept = key.clone(), value.clone()
    layer = PrefixedCacheLayer(key, value)
    layer.update(*_kv(2, 3, 1))
    layer.batch_repeat_interleave(2)
    layer.reorder_cache(torch.tensor([1, 0, 3, 2]))
    assert torch.equal(key, kept[0]) and torch.equal(value, kept[1])


def test_compute_dtype_follows_the_tokens():
    layer = PrefixedCacheLayer(*_kv(1, L, 0))
    k, v = (t.to(torch.bfloat16) for t in _kv(1, 2, 1))
    out_k, _ = layer.update(k, v)
    assert out_k.dtype == torch.bfloat16 and out_k.shape == (1, H, L + 2, D)


def test_crop_keeps_the_prefix_and_refuses_to_cut_into_it():
    layer, ref = PrefixedCacheLayer(*_kv(1, L, 0)), Reference(*_kv(1, L, 0))
    layer.update(*_kv(1, 5, 1)), ref.update(*_kv(1, 5, 1))
    layer.crop(-2)
    ref.k, ref.v = ref.k[:, :, :-2], ref.v[:, :, :-2]
    _same(layer, ref)
    with pytest.raises(ValueError, match="only 3 follow the prefix"):
        layer.crop(-4)
    layer.reset()
    assert layer.get_seq_length() == 0 and torch.equal(layer.keys, ref.k[:, :, :L])
