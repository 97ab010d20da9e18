"""The decoding entry points: token ids in, token ids out (`generate_ids`); texts in, texts out
(`generate_texts`); and the helpers that turn a GenerateConfig and sources into what they need.

Every row may carry its own prefix (or none); both run on the decoding engine (engine.py) wherever it
applies, else on transformers' own `generate`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel

from .. import _compat, inject, precision
from ..config import GenerateConfig, TextFormat
from ..prefix import PrefixKV, row_offsets, stack
from .beam import beam_fill
from .engine import Engine
from .request import Request, supported


def check_ids(input_ids: torch.Tensor) -> None:
    """Refuse empty or malformed input at the API boundary, not deep inside attention."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per row")


def generate_ids(base: PreTrainedModel, prefixes: Sequence[PrefixKV | None], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, prefill_once: bool = True,
                 seeds: Sequence[int | None] | None = None, **kwargs) -> torch.Tensor:
    """`base.generate(**kwargs)` with row i prefixed by prefixes[i]; input left-padded (decoder-only).

    Runs on the decoding engine (engine.py) where it can: decoder-only models and the options in
    `request.SUPPORTED`; greedy and beam search give exactly what transformers' `generate` gives, and
    sampling draws from a generator per row (seeds[i], or one drawn from torch's global generator), so a
    row samples the same whatever its neighbours. Anything else, and prefill_once=False (the reference in
    tests), runs transformers' own `generate` with the prefixes concatenated in every attention call.
    Returns what transformers returns (decoder-only: prompt + new tokens; encoder-decoder: decoder ids).
    """
    check_ids(input_ids)
    if len(prefixes) != input_ids.shape[0]:
        raise ValueError(f"{len(prefixes)} prefixes for {input_ids.shape[0]} input rows: give one per row (None for none)")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if prefill_once and supported(kwargs) and Engine.can_run(base):
        return _engine_generate(base, prefixes, input_ids, attention_mask, seeds, kwargs)
    return _transformers_generate(base, prefixes, input_ids, attention_mask, kwargs)


def _engine_generate(base, prefixes, input_ids, attention_mask, seeds, kwargs) -> torch.Tensor:
    rows = attention_mask.bool().tolist()
    requests = [Request([t for t, m in zip(ids, keep) if m] or ids[-1:], p, kwargs,
                        None if seeds is None else seeds[i])
                for i, (ids, keep, p) in enumerate(zip(input_ids.tolist(), rows, prefixes))]
    engine = Engine(base)
    engine.add(requests)
    engine.run()
    config = engine.setup(kwargs, 0)[0]
    if int(config.num_beams or 1) > 1:
        fill = beam_fill(config)
    else:  # greedy/sampling: transformers pads finished rows with pad_token_id
        pad = config._pad_token_tensor
        fill = int(pad) if pad is not None else int(next(iter(engine.eos_ids(config)), 0))
    outputs = [(i, seq) for i, r in enumerate(requests) for seq in r.outputs]
    width = max(len(seq) for _, seq in outputs)
    new = torch.full((len(outputs), width), fill, dtype=input_ids.dtype, device=input_ids.device)
    for j, (_, seq) in enumerate(outputs):
        new[j, : len(seq)] = torch.tensor(seq, dtype=input_ids.dtype)
    prompts = input_ids[torch.tensor([i for i, _ in outputs], device=input_ids.device)]
    return torch.cat([prompts, new], dim=1)


def _transformers_generate(base, prefixes, input_ids, attention_mask, kwargs) -> torch.Tensor:
    """transformers' `generate`, each row's prefix concatenated in every attention call."""
    given = [p for p in prefixes if p is not None]
    offsets, boundary = row_offsets(prefixes, input_ids.shape[1], input_ids.device)
    batch = None
    if given:
        shapes = given[0].shapes()
        batch = stack(prefixes, list(shapes), shapes, device=input_ids.device,
                      dtype=next(iter(given[0].kv.values()))[0].dtype, visible_from=boundary)
    if not _compat.is_encoder_decoder(base):
        kwargs["position_ids"] = inject.position_ids(attention_mask, offsets, boundary)
    with inject.active(batch):
        return base.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


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


def decode_workload(base: PreTrainedModel, lanes: int) -> precision.Workload:
    """One decoding step's work as `--bf16 auto` times it: `lanes` rows of one token through the frozen model
    and its full-vocabulary head (the weight-bound matmuls that dominate a step; no cache, no prefix)."""
    ids = torch.ones((lanes, 1), dtype=torch.long, device=next(base.parameters()).device)
    extra = {"decoder_input_ids": ids} if _compat.is_encoder_decoder(base) else {}

    def step() -> None:
        with torch.no_grad():
            base(input_ids=ids, **extra)

    return precision.Workload(f"decode {precision.model_key(base)} rows{precision.shape_bucket(lanes)}", step)


def decode_bf16(base: PreTrainedModel, config: GenerateConfig, sources: int) -> bool:
    """Whether decoding `sources` sources with `config` runs under bf16 autocast (auto: timed on its step)."""
    lanes = min(sources, config.batch_size) * config.num_beams
    return precision.bf16_wanted(config.bf16, next(base.parameters()).device, decode_workload(base, lanes))


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
    if config.seed is not None:  # transformers' path (e.g. encoder-decoder sampling) draws from torch's generator
        torch.manual_seed(config.seed)
    lengths = [len(tokenizer(s).input_ids) for s in sources]
    order = sorted(range(len(sources)), key=lambda i: lengths[i])
    bf16 = decode_bf16(base, config, len(sources))
    out: list[str] = [""] * len(sources)
    for start in range(0, len(order), config.batch_size):
        rows = order[start : start + config.batch_size]
        ids, mask = encode_sources(tokenizer, base, [sources[i] for i in rows], [formats[i] for i in rows])
        with torch.no_grad(), torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
            result = generate_ids(base, [prefixes[i] for i in rows], ids, mask,
                                  seeds=[config.seed] * len(rows) if config.seed is not None else None, **kwargs)
        new = result if _compat.is_encoder_decoder(base) else result[:, ids.shape[1]:]
        for i, text in zip(rows, tokenizer.batch_decode(new, skip_special_tokens=True)):
            out[i] = text.strip()
        if progress is not None:
            progress(len(rows))
    return out
