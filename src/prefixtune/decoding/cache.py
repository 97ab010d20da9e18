"""The decoding cache that holds each row's prefix in front of its keys/values, in a growable buffer.

Why a cache of our own: with transformers' DynamicLayer a decoding step concatenates every layer's whole
cache with the new token (a full copy per layer per step), and beam search's reorder copies it all again
(`index_select`). On E2E beam-5 decoding on CPU those two copies took about a third of the time. Here

- the keys/values live in a buffer with room to grow: a step writes one token in place;
- beam reordering copies only the positions after the point where a source's rows were repeated
  (`batch_repeat_interleave`): before it the rows of one source are identical copies, and beam search only
  moves rows within a source, so copying that part would change nothing. A reorder that mixes sources
  falls back to moving whole rows.

The prefix occupies the first L positions; the model sees only its real tokens (`get_seq_length` excludes
the prefix, so positions and the masks transformers builds are unchanged) while `update` returns
[prefix; real] keys; `inject.prefix_attention` adds the prefix columns to the mask (`PrefixBatch.in_cache`).

Shapes: buffer (rows, KVH, capacity, D); `keys`/`values` are views of its first `prefix + t` positions.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, PreTrainedModel

from .._compat import CacheLayerBase, new_cache

#: Positions a buffer gains beyond what it needs when it is (re)allocated; doubling when it runs out.
_HEADROOM = 64


class PrefixedCacheLayer(CacheLayerBase):
    """One decoder layer's cache: prefix keys/values first, then the real tokens', in a growable buffer."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        self.prefix_length = int(key.shape[2])
        self.lazy_initialization(key, value)
        self.keys, self.values = key, value  # the prefix itself until the first write: it is never written to
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None
        self._group = 1  # rows come in groups of this many consecutive copies of one source...
        self._shared = 0  # ...identical in their first `_shared` positions

    def _length(self) -> int:
        return int(self.keys.shape[-2])

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, capacity: int) -> None:
        """Fresh buffers of `capacity` positions holding `keys`/`values` (rows, KVH, n, D) at the front."""
        n = int(keys.shape[2])
        self._kbuf = keys.new_empty(*keys.shape[:2], capacity, keys.shape[3])
        self._vbuf = values.new_empty(*values.shape[:2], capacity, values.shape[3])
        self._kbuf[:, :, :n] = keys
        self._vbuf[:, :, :n] = values
        self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.keys.dtype != key_states.dtype:  # e.g. bf16 autocast: prefix in the compute dtype, once
            self.keys, self.values = self.keys.to(key_states.dtype), self.values.to(value_states.dtype)
            self._kbuf = self._vbuf = None
        n, new = self._length(), int(key_states.shape[2])
        if self._kbuf is None or n + new > self._kbuf.shape[2]:  # (a dtype change above dropped the buffer)
            capacity = max(n + new + _HEADROOM, 2 * (0 if self._kbuf is None else self._kbuf.shape[2]))
            self._allocate(self.keys, self.values, capacity)
        self._kbuf[:, :, n : n + new] = key_states
        self._vbuf[:, :, n : n + new] = value_states
        self.keys, self.values = self._kbuf[:, :, : n + new], self._vbuf[:, :, : n + new]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length() - self.prefix_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam_idx = beam_idx.to(self.keys.device)
        n, start = self._length(), self._shared
        rows = torch.arange(beam_idx.shape[0], device=beam_idx.device)
        if self._kbuf is None or not (self._group > 1 and torch.equal(beam_idx // self._group, rows // self._group)):
            # Rows move across groups (or nothing is buffered yet): move whole rows. DynamicLayer skips this
            # while no real token is cached, but the prefix rows must follow anyway.
            self._group, self._shared = 1, 0
            self._gather_rows(beam_idx)
        elif start < n:  # the gather on the right copies first, so reading and writing one buffer is safe
            self._kbuf[:, :, start:n] = self._kbuf[beam_idx, :, start:n]
            self._vbuf[:, :, start:n] = self._vbuf[beam_idx, :, start:n]

    def batch_repeat_interleave(self, repeats: int) -> None:
        n = self._length()
        self._allocate(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0),
                       n + _HEADROOM)
        self._group, self._shared = repeats, n

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = indices.to(self.keys.device)
        if not _whole_groups(indices, self._group):  # the kept rows no longer come as whole groups of copies
            self._group, self._shared = 1, 0
        self._gather_rows(indices)

    def _gather_rows(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (in that order): one copy straight into a new buffer of the same capacity."""
        n = self._length()
        if self._kbuf is None:
            self._allocate(self.keys.index_select(0, indices), self.values.index_select(0, indices), n + _HEADROOM)
            return
        kbuf = torch.index_select(self._kbuf, 0, indices)
        vbuf = torch.index_select(self._vbuf, 0, indices)
        self._kbuf, self._vbuf = kbuf, vbuf
        self.keys, self.values = kbuf[:, :, :n], vbuf[:, :, :n]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and -tokens_to_remove > self.get_seq_length():
            raise ValueError(f"cannot crop {-tokens_to_remove} tokens: only {self.get_seq_length()} follow the prefix")
        super().crop(tokens_to_remove)
        self._shared = min(self._shared, self._length())

    def reset(self) -> None:
        """Forget the real tokens; the prefix stays."""
        if self.get_seq_length():
            self.crop(-self.get_seq_length())


def _whole_groups(indices: torch.Tensor, group: int) -> bool:
    """True when `indices` keeps whole groups of `group` consecutive rows, each in its own order."""
    if group < 2 or indices.numel() % group:
        return False
    rows = indices.view(-1, group)
    return bool(torch.equal(rows, rows[:, :1] + torch.arange(group, device=rows.device))
                and (rows[:, 0] % group == 0).all())


def prefixed_cache(model: PreTrainedModel, layer_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache | None:
    """A decoder-only model's DynamicCache starting with one prefix (key, value) per layer, in layer order.

    None where the cache would not hold the prefix the way attention sees it: sliding-window layers
    (they would evict it), or a layer count that does not match.
    """
    cache = new_cache(model)
    if len(cache.layers) != len(layer_kv) or any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return None
    cache.layers = [PrefixedCacheLayer(k, v) for k, v in layer_kv]
    return cache


def merge(model: PreTrainedModel, first: DynamicCache, second: DynamicCache) -> DynamicCache:
    """One cache holding the rows of `first`, then those of `second` (rows joining a running batch).

    Per layer: the prefix regions are padded at their end to the longer prefix (those slots are masked
    by the rows' prefix masks, padded the same way), and the real regions are left-padded to the longer
    one (masked by the attention mask, left-padded the same way). Padding is zeros, never read unmasked.
    """
    merged = new_cache(model)
    merged.layers = [_merge_layers(a, b) for a, b in zip(first.layers, second.layers)]
    return merged


def _merge_layers(a: PrefixedCacheLayer, b: PrefixedCacheLayer) -> PrefixedCacheLayer:
    prefix = max(a.prefix_length, b.prefix_length)
    real = max(a.get_seq_length(), b.get_seq_length())
    rows_a, rows_b = a.keys.shape[0], b.keys.shape[0]
    dtype = a.keys.dtype if a.keys.dtype == b.keys.dtype else torch.float32
    shape = (rows_a + rows_b, a.keys.shape[1], prefix + real + _HEADROOM, a.keys.shape[3])
    kbuf = a.keys.new_zeros(shape, dtype=dtype)
    vbuf = a.values.new_zeros(shape, dtype=dtype)
    for rows, layer in ((slice(0, rows_a), a), (slice(rows_a, rows_a + rows_b), b)):
        p, n = layer.prefix_length, layer.get_seq_length()
        kbuf[rows, :, :p], vbuf[rows, :, :p] = layer.keys[:, :, :p], layer.values[:, :, :p]
        kbuf[rows, :, prefix + real - n : prefix + real] = layer.keys[:, :, p:]
        vbuf[rows, :, prefix + real - n : prefix + real] = layer.values[:, :, p:]
    out = PrefixedCacheLayer(kbuf[:, :, :prefix], vbuf[:, :, :prefix])
    out._kbuf, out._vbuf = kbuf, vbuf
    out.keys, out.values = kbuf[:, :, : prefix + real], vbuf[:, :, : prefix + real]
    return out


def trim_left(cache: DynamicCache, columns: int) -> None:
    """Drop the first `columns` real positions of every row (columns that are padding in every row)."""
    if columns <= 0:
        return
    for layer in cache.layers:
        p, n = layer.prefix_length, layer._length()
        keys = torch.cat([layer.keys[:, :, :p], layer.keys[:, :, p + columns : n]], dim=2)
        values = torch.cat([layer.values[:, :, :p], layer.values[:, :, p + columns : n]], dim=2)
        layer._allocate(keys, values, int(keys.shape[2]) + _HEADROOM)
        layer._group, layer._shared = 1, 0
