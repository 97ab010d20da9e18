"""The one place where prefixes enter the model's attention.

Design: prefixtune registers an attention implementation ("prefixtune") with transformers'
`AttentionInterface`. Every attention module of the base model is tagged with its slot
`(role, layer)`; when a `PrefixBatch` is active (a context variable), the attention function
concatenates that slot's prefix keys/values in front of the real ones and extends the mask with the
prefix columns, then calls the model's usual attention (sdpa or eager). Encoder self-attention and
cross-attention are reached the same way as decoder self-attention. In training and in transformers'
own `generate` nothing is put into the model's cache, so every step, beam reordering and cache
implementation sees the prefix. The decoding engine (decoding/) instead starts from a cache that already
holds each row's prefix in front of every layer's keys (`PrefixBatch.in_cache`): then this function adds
only the prefix's mask columns.

Shapes: query (B, H, q, D); key/value (B, KVH, k, D); prefix key/value (B, KVH, L, D); prefix mask (B, L).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from . import _compat

ATTENTION_NAME = "prefixtune"
_SLOT_ATTR = "_prefixtune_slot"
_BASE_ATTR = "_prefixtune_base"
_SHAPES_ATTR = "_prefixtune_shapes"

Slot = tuple[str, int]  # (role, layer index within that role)
KV = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PrefixBatch:
    """The prefixes of one batch, one row each, keyed by attention slot.

    kv[slot] = (key, value), each (B, KVH, L, D); mask (B, L) is True at a row's real prefix slots
    (rows with shorter prefixes, or none, have False padding slots). visible_from (B,), for infix
    prefixes only: index, in the key sequence, of the first query allowed to see the prefix.
    """

    kv: dict[Slot, KV]
    mask: torch.Tensor
    visible_from: torch.Tensor | None = None
    in_cache: bool = False
    """True while the model's cache already holds these prefixes in front of each layer's keys
    (`cache.PrefixedCacheLayer`): attention then only adds the prefix columns to the mask."""
    _expanded: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return int(self.mask.shape[0])

    def covers(self, slot: Slot) -> bool:
        """Whether attention slot `slot` gets a prefix from this batch (in kv, or already in the cache)."""
        return slot in self.kv or (self.in_cache and slot[0] == "self")

    def _factor(self, n_rows: int) -> int:
        """Generation may expand each row to consecutive rows (beams, returned sequences); beam
        reordering only permutes rows of the same input, so repeating each prefix row in place keeps
        every row with its own prefix."""
        if n_rows % self.batch_size:
            raise RuntimeError(f"attention batch of {n_rows} rows does not extend a prefix batch of {self.batch_size}")
        return n_rows // self.batch_size

    def mask_rows(self, n_rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefix mask (n_rows, L) and visible_from (n_rows,) or None, for a batch of `n_rows`."""
        r = self._factor(n_rows)
        if r == 1:
            return self.mask, self.visible_from
        if ("mask", r) not in self._expanded:
            vis = None if self.visible_from is None else self.visible_from.repeat_interleave(r, 0)
            self._expanded[("mask", r)] = (self.mask.repeat_interleave(r, 0), vis)
        return self._expanded[("mask", r)]

    def kv_rows(self, slot: Slot, n_rows: int) -> KV:
        """Prefix key and value (n_rows, KVH, L, D) of `slot` for a batch of `n_rows`."""
        key, value = self.kv[slot]
        r = self._factor(n_rows)
        if r == 1:
            return key, value
        if (slot, r) not in self._expanded:
            self._expanded[(slot, r)] = (key.repeat_interleave(r, 0), value.repeat_interleave(r, 0))
        return self._expanded[(slot, r)]


_ACTIVE: ContextVar[PrefixBatch | None] = ContextVar("prefixtune_active", default=None)
_CAPTURE: ContextVar[dict | None] = ContextVar("prefixtune_capture", default=None)


@contextlib.contextmanager
def active(batch: PrefixBatch | None) -> Iterator[None]:
    """Run the model with `batch` as its prefixes (None: the plain base model)."""
    token = _ACTIVE.set(batch)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def checkpoint_context() -> tuple:
    """`context_fn` for torch's non-reentrant activation checkpointing.

    Recomputation runs during backward, outside the `active(...)` block of the forward pass; this
    re-activates the forward pass's prefixes for it, so recomputed attention sees the same prefix.
    """
    return contextlib.nullcontext(), active(_ACTIVE.get())


@contextlib.contextmanager
def capture() -> Iterator[dict[Slot, KV]]:
    """Record the keys/values every attention slot computes (post-rotary), e.g. to init from words."""
    found: dict[Slot, KV] = {}
    token = _CAPTURE.set(found)
    try:
        yield found
    finally:
        _CAPTURE.reset(token)


def prefix_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: base attention over [prefix; real] keys/values."""
    slot = getattr(module, _SLOT_ATTR, None)
    if slot is not None:
        found = _CAPTURE.get()
        if found is not None:
            found[slot] = (key, value)
        batch = _ACTIVE.get()
        if batch is not None and batch.covers(slot):
            pmask, visible_from = batch.mask_rows(query.shape[0])
            width = pmask.shape[1]
            real_len = key.shape[2] - (width if batch.in_cache else 0)
            in_window = _compat.prefix_in_window(module, kwargs, pmask, visible_from, real_len)
            attention_mask = _extended_mask(module, query, real_len, attention_mask, pmask, visible_from, in_window)
            if not batch.in_cache:
                pk, pv = batch.kv_rows(slot, query.shape[0])
                key = torch.cat([pk.to(key.dtype), key], dim=2)
                value = torch.cat([pv.to(value.dtype), value], dim=2)
            _compat.extend_position_bias(kwargs, width)
    base = _compat.base_attention(module, getattr(module, _BASE_ATTR, "sdpa"))
    return base(module, query, key, value, attention_mask, **kwargs)


def _extended_mask(module, query, k_len: int, mask, prefix_mask, visible_from, in_window=None) -> torch.Tensor:
    """Additive (B, 1, q, L + k) mask: prefix columns first, then the model's own mask over k real keys.

    in_window (B, 1, q, L) or None: which prefix slots a sliding-window layer's queries still reach."""
    b, q_len, dtype = query.shape[0], query.shape[2], query.dtype
    if mask is None:
        mask = torch.zeros(b, 1, q_len, k_len, dtype=dtype, device=query.device)
        if getattr(module, "is_causal", False) and q_len > 1:  # bottom-right aligned causal mask
            blocked = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).triu(k_len - q_len + 1)
            mask = mask.masked_fill(blocked, torch.finfo(dtype).min)
    else:
        mask = _compat.float_mask(mask[..., :k_len], dtype).expand(b, 1, q_len, k_len)
    allowed = prefix_mask[:, None, None, :].expand(b, 1, q_len, prefix_mask.shape[1])
    if visible_from is not None:  # infix: queries before the boundary (the source) do not see it
        q_index = torch.arange(k_len - q_len, k_len, device=query.device)
        allowed = allowed & (q_index[None, None, :, None] >= visible_from[:, None, None, None])
    if in_window is not None:
        allowed = allowed & in_window
    zero = torch.zeros((), dtype=dtype, device=query.device)
    prefix_cols = torch.where(allowed, zero, torch.finfo(dtype).min)
    return torch.cat([prefix_cols, mask], dim=-1)


_compat.register_attention(ATTENTION_NAME, prefix_attention)


def attach(model: PreTrainedModel) -> list[Slot]:
    """Tag the model's attention modules with their slots and route them through `prefix_attention`.

    Idempotent. The base model's behaviour is unchanged while no `PrefixBatch` is active.
    """
    _compat.check_supported(model)
    current = model.config._attn_implementation
    base_impl = "eager" if current == "eager" else "sdpa"
    counters: dict[str, int] = {}
    slots: list[Slot] = []
    for _, role, module in _compat.attention_modules(model):
        slot = (role, counters.get(role, 0))
        counters[role] = slot[1] + 1
        if getattr(module, _SLOT_ATTR, None) is None:
            setattr(module, _BASE_ATTR, base_impl)
        setattr(module, _SLOT_ATTR, slot)
        slots.append(slot)
    if not slots:
        raise _compat.UnsupportedModelError(f"found no attention modules in {type(model).__name__}")
    if current != ATTENTION_NAME:
        _compat.set_attention_implementation(model, ATTENTION_NAME)
    return slots


def prepare(model: PreTrainedModel) -> tuple[list[Slot], dict[Slot, tuple[int, int]]]:
    """`attach` the model and read its slot shapes, once per model: (slots, {slot: (KVH, D)})."""
    known = getattr(model, _SHAPES_ATTR, None)
    if known is None or model.config._attn_implementation != ATTENTION_NAME:
        slots = attach(model)
        known = (slots, layer_shapes(model, slots))
        setattr(model, _SHAPES_ATTR, known)
    return known


def run_capture(model: PreTrainedModel, input_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None) -> dict[Slot, KV]:
    """Keys/values of every slot for one forward pass over (1, T) tokens at positions 0..T-1.

    Give token ids or input embeddings (the embedding-only ablation). For encoder-decoder models the
    same input feeds the encoder and the decoder, so encoder, decoder self-attention and
    cross-attention slots are all recorded. No prefix is active during the pass.
    """
    kwargs = {"input_ids": input_ids, "inputs_embeds": inputs_embeds}
    if _compat.is_encoder_decoder(model):
        kwargs.update(decoder_input_ids=input_ids, decoder_inputs_embeds=inputs_embeds)
    with capture() as found, active(None):
        model(use_cache=False, **{k: v for k, v in kwargs.items() if v is not None})
    return found


def layer_shapes(model: PreTrainedModel, slots: Sequence[Slot]) -> dict[Slot, tuple[int, int]]:
    """(key/value heads, head dim) of each slot, read off a 2-token forward pass.

    Reading shapes from real attention calls covers grouped-query attention, explicit head_dim and
    layers of different shapes without per-architecture config parsing; a slot that never reaches the
    attention interface is an unsupported module.
    """
    device = next(model.parameters()).device
    with torch.no_grad():
        found = run_capture(model, torch.zeros(1, 2, dtype=torch.long, device=device))
    missing = [s for s in slots if s not in found]
    if missing:
        raise _compat.UnsupportedModelError(
            f"attention slots {missing[:4]} of {type(model).__name__} do not go through transformers' "
            "AttentionInterface, so prefixes cannot reach them"
        )
    return {s: (int(found[s][0].shape[1]), int(found[s][0].shape[3])) for s in slots}


def position_ids(attention_mask: torch.Tensor, offsets: torch.Tensor, boundary: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of real tokens in a padded batch, counting each row's prefix as tokens before them.

    Prefix, z = [PREFIX; x]: the row's first real token sits at position `offsets[row]` (its prefix
    length), exactly as if the prefix were L tokens already in the cache (PEFT's convention too).
    Infix, z = [x; INFIX; y]: tokens before `boundary[row]` (an index into the padded row) keep their
    plain positions and the rest move up by the infix length. attention_mask (B, T) -> (B, T).
    """
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    shift = offsets.to(pos.device)[:, None].expand_as(pos)
    if boundary is not None:
        index = torch.arange(pos.shape[1], device=pos.device)[None]
        shift = shift * (index >= boundary.to(pos.device)[:, None])
    return pos + shift
