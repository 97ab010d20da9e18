"""Helpers shared by the decoding and serving tests: random prefixes that matter, left-padded batches."""

from __future__ import annotations

import torch

from conftest import PAD
from prefixtune import PrefixConfig, PrefixTuningModel


def random_prefixes(model, lengths, seed=0, variant="prefix"):
    """Distinct random prefixes of the given lengths for one base model (scaled so they change outputs)."""
    out = []
    for i, n in enumerate(lengths):
        ptm = PrefixTuningModel(model, PrefixConfig(prefix_length=n, reparam="table", seed=seed + i, variant=variant))
        with torch.no_grad():
            for enc in ptm.encoders.values():
                enc.table.mul_(3.0)
        out.append(ptm.prefix_kv().detach())
    return out


def left_pad(rows):
    """(ids, mask) of token lists, left-padded with PAD."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask
