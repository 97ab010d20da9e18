"""Batched generation where every row may carry its own prefix (or none).

Greedy, beam search and sampling all go through transformers' `generate`; the prefixes stay outside
the cache (see inject.py), and each row's positions start after its own prefix, so a row generates the
same text in a mixed, left-padded batch as alone.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from . import _compat, beam, inject, precision
from .cache import prefixed_cache
from .config import GenerateConfig, TextFormat
from .prefix import PrefixKV, stack


def check_ids(input_ids: torch.Tensor) -> None:
    """Refuse empty or malformed input at the API boundary, not deep inside attention."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row")


def generate_ids(base: PreTrainedModel, prefixes: Sequence[PrefixKV | None], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, prefill_once: bool = True, **kwargs) -> torch.Tensor:
    """`base.generate` with row i prefixed by prefixes[i]; input left-padded (decoder-only).

    prefill_once: start from a cache holding each row's prefix and prompt (see `prompt_cache`), and run
    beam search with `beam.beam_search`, which stops computing finished sources; False runs transformers'
    own `generate`, prefixes concatenated at every step (the reference in tests).
    Returns what transformers returns (decoder-only: prompt + new tokens; encoder-decoder: decoder ids).
    """
    check_ids(input_ids)
    if len(prefixes) != input_ids.shape[0]:
        raise ValueError(f"{len(prefixes)} prefixes for {input_ids.shape[0]} input rows: give one per row (None for none)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    given = [p for p in prefixes if p is not None]
    # Infix rows: the last prompt token (the separator) and all generated tokens see the infix.
    boundary = torch.tensor([input_ids.shape[1] - 1 if p is not None and p.infix else 0 for p in prefixes],
                            device=input_ids.device)
    has_infix = any(p.infix for p in given)
    batch = None
    if given:
        shapes = given[0].shapes()
        batch = stack(prefixes, list(shapes), shapes, device=input_ids.device,
                      dtype=next(iter(given[0].kv.values()))[0].dtype, visible_from=boundary if has_infix else None)
    if not _compat.is_encoder_decoder(base):
        offsets = torch.tensor([0 if p is None else p.length for p in prefixes], device=input_ids.device)
        kwargs["position_ids"] = inject.position_ids(attention_mask, offsets, boundary if has_infix else None)
    with inject.active(batch):
        if prefill_once and "past_key_values" not in kwargs and not _compat.is_encoder_decoder(base):
            cache = prompt_cache(base, batch, input_ids, attention_mask, kwargs)
            if cache is not None and beam.supported(kwargs):
                return beam.beam_search(base, batch, input_ids, attention_mask, cache, kwargs)
            kwargs["past_key_values"] = cache
        return base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def prompt_cache(base: PreTrainedModel, batch: inject.PrefixBatch | None, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, kwargs: dict) -> DynamicCache | None:
    """The cache `generate` starts from: each row's prefix, then its prompt but the last token.

    Two savings over transformers' own path, which leaves the cache empty:
    - transformers copies every prompt max(num_beams, num_return_sequences) times *before* running it,
      so beam search pays the prompt's compute once per beam (about a quarter of E2E beam-5 decoding
      time on CPU). Here the prompt runs once per row and its cache is copied, rows repeated in place
      as generate repeats them; generate is left with the last prompt token.
    - with the prefix in the cache (`cache.PrefixedCacheLayer`, `PrefixBatch.in_cache`), a decoding
      step appends one token per layer instead of concatenating prefix and cache anew.
    Decoder-only models, run inside `inject.active(batch)`. None when neither saving applies.
    """
    config = kwargs.get("generation_config")

    def setting(name):  # a keyword wins over a GenerationConfig, as in `generate`
        return int(kwargs.get(name) or getattr(config, name, None) or 1)

    copies = max(setting("num_beams"), setting("num_return_sequences"))  # generate's own expand_size
    cache = None
    if batch is not None and set(batch.kv) == {("self", i) for i in range(len(batch.kv))}:
        cache = prefixed_cache(base, [batch.kv[("self", i)] for i in range(len(batch.kv))])
        batch.in_cache = cache is not None
    if cache is None:
        if copies == 1 or input_ids.shape[1] < 2:
            return None
        cache = DynamicCache(config=base.config)
    if input_ids.shape[1] >= 2:
        base.base_model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                        position_ids=kwargs["position_ids"][:, :-1], past_key_values=cache, use_cache=True)
    if copies > 1:
        cache.batch_repeat_interleave(copies)
    return cache


_NEWLINE_IDS: dict[int, list[list[int]]] = {}


def newline_token_ids(tokenizer) -> list[list[int]]:
    """Every token whose text contains a newline, as `bad_words_ids` (computed once per tokenizer)."""
    key = id(tokenizer)
    if key not in _NEWLINE_IDS:
        vocab = len(tokenizer)
        texts = tokenizer.batch_decode([[i] for i in range(vocab)])
        _NEWLINE_IDS[key] = [[i] for i, t in enumerate(texts) if "\n" in t]
    return _NEWLINE_IDS[key]


def decoding_kwargs(tokenizer, config: GenerateConfig) -> dict:
    """transformers `generate` arguments for a GenerateConfig."""
    config.validate()
    kwargs = dict(
        num_beams=config.num_beams, max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
        do_sample=config.do_sample, length_penalty=config.length_penalty,
        early_stopping=config.early_stopping if config.num_beams > 1 else False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p)
    if config.block_newlines:
        bad = newline_token_ids(tokenizer)
        if bad:
            kwargs["bad_words_ids"] = bad
    return kwargs


def encode_sources(tokenizer, base: PreTrainedModel, sources: Sequence[str], formats: Sequence[TextFormat]):
    """Tokenize sources as the model reads them: left-padded; decoder-only through the task's format."""
    if _compat.is_encoder_decoder(base):
        texts = list(sources)
    else:
        texts = [f.render_source(s, tokenizer.eos_token) for s, f in zip(sources, formats)]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    device = next(base.parameters()).device
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def generate_texts(base: PreTrainedModel, tokenizer, prefixes: Sequence[PrefixKV | None], sources: Sequence[str],
                   formats: Sequence[TextFormat], config: GenerateConfig | None = None,
                   progress: Callable[[int], None] | None = None) -> list[str]:
    """Generate one text per source; row i uses prefixes[i] and formats[i]. Order is preserved.

    Rows are grouped by token length into batches of `config.batch_size` to waste less on padding;
    that does not change any row's output (tested). `progress(n)` is called after each batch of n rows.
    """
    config = (config or GenerateConfig()).validate()
    if not (len(prefixes) == len(sources) == len(formats)):
        raise ValueError(f"got {len(sources)} sources, {len(prefixes)} prefixes and {len(formats)} formats; need one each")
    empty = [i for i, s in enumerate(sources) if not isinstance(s, str) or not s.strip()]
    if empty:
        raise ValueError(f"empty input text at position(s) {empty[:10]}: every source needs some text")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = decoding_kwargs(tokenizer, config)
    if config.seed is not None:
        torch.manual_seed(config.seed)
    lengths = [len(tokenizer(s).input_ids) for s in sources]
    order = sorted(range(len(sources)), key=lambda i: lengths[i])
    bf16 = precision.bf16_wanted(config.bf16, next(base.parameters()).device)
    out: list[str] = [""] * len(sources)
    for start in range(0, len(order), config.batch_size):
        rows = order[start : start + config.batch_size]
        ids, mask = encode_sources(tokenizer, base, [sources[i] for i in rows], [formats[i] for i in rows])
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            result = generate_ids(base, [prefixes[i] for i in rows], ids, mask, **kwargs)
        new = result if _compat.is_encoder_decoder(base) else result[:, ids.shape[1]:]
        for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
            out[i] = text.strip()
        if progress is not None:
            progress(len(rows))
    return out
