"""Turning (source, target) pairs into training tensors; the loss on target tokens only."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from .config import TextFormat
from .tasks import Example

IGNORE = -100


@dataclass
class Encoded:
    """One tokenized pair. Decoder-only: input_ids = source + target, labels = -100 on the source.
    Encoder-decoder: input_ids = source, labels = target."""

    input_ids: list[int]
    labels: list[int]


def _clip(ids: list[int], limit: int) -> list[int]:
    """Keep the first limit-1 tokens and the last one (the separator / end-of-text)."""
    return ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:]


def encode(examples: Sequence[Example], tokenizer, fmt: TextFormat, encoder_decoder: bool,
           max_source: int = 256, max_target: int = 128) -> list[Encoded]:
    """Tokenize pairs exactly as generation will see the source (see generate.encode_sources)."""
    out = []
    for ex in examples:
        if encoder_decoder:
            src = tokenizer(ex.source).input_ids
            tgt = tokenizer(text_target=ex.target).input_ids
            out.append(Encoded(_clip(src, max_source), _clip(tgt, max_target)))
            continue
        src = _clip(tokenizer(fmt.render_source(ex.source, tokenizer.eos_token)).input_ids, max_source)
        tgt = tokenizer(fmt.render_target(ex.target, tokenizer.eos_token), add_special_tokens=False).input_ids
        tgt = _clip(tgt, max_target)
        out.append(Encoded(src + tgt, [IGNORE] * len(src) + tgt))
    return out


def collate(rows: Sequence[Encoded], pad_id: int, encoder_decoder: bool) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding)."""
    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_width = max(len(r.labels) for r in rows) if encoder_decoder else width
    labels = torch.full((len(rows), label_width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
        mask[i, : len(r.input_ids)] = 1
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_tokens(rows: Sequence[Encoded], encoder_decoder: bool) -> int:
    """Number of tokens the loss is taken over (decoder-only: targets predicted from their left)."""
    if encoder_decoder:
        return sum(len(r.labels) for r in rows)
    return sum(sum(1 for t in r.labels[1:] if t != IGNORE) for r in rows)


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch `epoch`: a function of (seed, epoch) only, so a resumed run
    replays exactly the batches an uninterrupted one would."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def row_length(row: Encoded) -> int:
    """Tokens a row puts through the model (source, and target where it is separate): its padding cost."""
    return len(row.input_ids) + len(row.labels)


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                window: int = 8) -> list[int]:
    """The rows of epoch `epoch` in batch order: batch k is order[k * batch_size : (k + 1) * batch_size].

    group_by_length: within each window of `window` shuffled batches, rows are sorted by length before
    being cut into batches, and the batches are then shuffled. Random batches of E2E pairs are ~25%
    padding, which the frozen model computes through forward and backward; windows of 8 batches bring
    that to ~5% while batches still vary from epoch to epoch. The rows left over by the last full batch
    come last (training drops them), as without grouping. A function of (seed, epoch) only, for --resume.
    """
    order = epoch_order(len(lengths), seed, epoch)
    if not group_by_length:
        return order
    full = len(order) // batch_size * batch_size
    span = batch_size * window
    batches = []
    for start in range(0, full, span):
        chunk = sorted(order[start : min(start + span, full)], key=lambda i: lengths[i])
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    random.Random(seed * 1_000_003 + epoch + 500_009).shuffle(batches)
    return [i for batch in batches for i in batch] + order[full:]


def summed_loss(logits: torch.Tensor, labels: torch.Tensor, shift: bool) -> torch.Tensor:
    """Sum of token cross-entropies where labels != -100 (decoder-only: predict token t+1 at t)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
