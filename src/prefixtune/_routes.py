"""Attention routes for models that compute attention inside their own modules (reached through _compat.py).

Falcon and GPT-J (transformers 5.23) do not call transformers' AttentionInterface: their attention modules
multiply queries and keys themselves, so no registered attention function, and so no prefix, reaches them.
A route gives such a module the same computation with the attention step handed to the interface; the
function the interface then calls without a prefix (`Route.base`) is the module's own attention step, so
the model computes what it computed before (tested against an untouched copy of the model).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

_ROUTE_ATTR = "_prefixtune_route"


@dataclass(frozen=True)
class Route:
    """How one attention module class is made to go through the AttentionInterface."""

    module_class: str
    """Class name of the attention modules this route applies to."""
    install: Callable[[nn.Module], None]
    """Makes one such module hand its attention step to the interface."""
    base: Callable
    """The module's own attention step, as an interface function: (module, q, k, v, mask, **kw) -> (out, w)."""


def _interface(module: nn.Module) -> Callable:
    return ALL_ATTENTION_FUNCTIONS[module.config._attn_implementation]


# --- Falcon: the rotary path of FalconAttention.forward, attention through the interface ---------------------

def _falcon_forward(self, hidden_states, alibi, attention_mask, position_ids=None, layer_past=None, use_cache=False,
                    output_attentions=False, position_embeddings=None, **kwargs):
    """FalconAttention.forward without ALiBi (refused by _compat.refused_feature), up to the attention step."""
    query, key, value = self._split_heads(self.query_key_value(hidden_states))
    b, n = query.shape[:2]
    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query = query.transpose(1, 2).reshape(b, self.num_heads, n, self.head_dim)
    key = key.transpose(1, 2).reshape(b, kv_heads, n, self.head_dim)
    value = value.transpose(1, 2).reshape(b, kv_heads, n, self.head_dim)
    cos, sin = position_embeddings
    query, key = sys.modules[type(self).__module__].apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    out, weights = _interface(self)(self, query, key, value, attention_mask, scaling=self.inv_norm_factor)
    return self.dense(out.reshape(b, n, self.num_heads * self.head_dim)), weights


def _falcon_base(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Falcon's attention step: softmax(q k^T / sqrt(d) + mask) v, multi-query keys broadcast over heads
    (its sdpa and eager branches compute the same; the mask prefixtune gets is always materialised)."""
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2), None


def _falcon_install(module: nn.Module) -> None:
    module.forward = _falcon_forward.__get__(module)


# --- GPT-J: its `_attn` step through the interface ----------------------------------------------------------

def _gptj_attn(self, query, key, value, attention_mask=None):
    out, weights = _interface(self)(self, query, key, value, attention_mask)
    return out.transpose(1, 2), weights


def _gptj_base(module, query, key, value, attention_mask, **kwargs):
    """GPT-J's own `_attn` (fp32 scores, scaled by 1/sqrt(d)), returning (B, q, H, D) as interface functions do."""
    out, weights = type(module)._attn(module, query, key, value, attention_mask)
    return out.transpose(1, 2), weights


def _gptj_install(module: nn.Module) -> None:
    module._attn = _gptj_attn.__get__(module)


#: model_type -> its route.
ROUTES: dict[str, Route] = {
    "falcon": Route("FalconAttention", _falcon_install, _falcon_base),
    "gptj": Route("GPTJAttention", _gptj_install, _gptj_base),
}


def install(model: nn.Module, route: Route) -> int:
    """Route every attention module of `model` that `route` applies to (idempotent); returns how many."""
    count = 0
    for module in model.modules():
        if type(module).__name__ == route.module_class:
            if getattr(module, _ROUTE_ATTR, None) is None:
                route.install(module)
                setattr(module, _ROUTE_ATTR, route)
            count += 1
    return count


def base_of(module: nn.Module) -> Callable | None:
    """The routed module's own attention step, or None for a module that is not routed."""
    route = getattr(module, _ROUTE_ATTR, None)
    return None if route is None else route.base
