"""What the decoding engine decodes: one source (`Request`), and the decoding options it accepts.

The engine knows nothing of HTTP or files: a caller (generate_ids, generate_texts, the server) hands it
requests and reads results through callbacks or the request's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..prefix import PrefixKV

#: generate() keywords the engine implements; anything else goes to transformers' own generate. All of
#: them are independent of the prompt's content, which lets greedy/sampling rows of different prompt
#: lengths share one logits-processor call (see step.py).
SUPPORTED = {"num_beams", "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k",
             "length_penalty", "early_stopping", "eos_token_id", "pad_token_id", "bad_words_ids",
             "num_return_sequences"}


def supported(kwargs: dict) -> bool:
    """True for options the engine decodes exactly as transformers' `generate` would."""
    if not set(kwargs) <= SUPPORTED or kwargs.get("max_new_tokens") is None:
        return False
    beams, returned = int(kwargs.get("num_beams") or 1), int(kwargs.get("num_return_sequences") or 1)
    if beams > 1:
        return not kwargs.get("do_sample") and returned <= beams
    return returned == 1


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of token lists, left-padded as decoder-only generation needs."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def options_key(kwargs: dict) -> tuple:
    """A hashable key of decoding options: requests with equal keys can share processors and a beam cohort."""
    parts = []
    for name in sorted(kwargs):
        value = kwargs[name]
        if name == "bad_words_ids":
            value = tuple(tuple(ids) for ids in value)
        parts.append((name, tuple(value) if isinstance(value, list) else value))
    return tuple(parts)


@dataclass(eq=False)
class Request:
    """One source to decode and where its results go.

    prompt: real token ids (no padding). kwargs: generate() keywords (`supported`). For greedy and
    sampling requests `on_token(request, token)` is called for each new token; `on_done(request)` once at
    the end, when `outputs` holds the generated ids (num_return_sequences lists for beam search, one
    otherwise; the end-of-text token included where one was generated).
    """

    prompt: list[int]
    prefix: PrefixKV | None
    kwargs: dict
    seed: int | None = None
    """Sampling seed of this request's own generator (None: drawn from torch's global generator)."""
    on_token: Callable[["Request", int], None] | None = None
    on_done: Callable[["Request"], None] | None = None
    cancelled: bool = False
    """Set by the caller: the engine drops the request before its next step, without calling on_done."""
    tokens: list[int] = field(default_factory=list)
    """Generated so far (greedy and sampling)."""
    outputs: list[list[int]] = field(default_factory=list)
    key: tuple = ()
    generator: torch.Generator | None = None
    """Sampling requests: their own random generator (step.StepGroup seeds it)."""

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("a request needs at least one prompt token")
        self.key = options_key(self.kwargs)

    @property
    def num_beams(self) -> int:
        return int(self.kwargs.get("num_beams") or 1)
