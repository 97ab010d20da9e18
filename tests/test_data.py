"""Batch order: every kept row once per epoch, less padding when grouped, a function of (seed, epoch)."""

from __future__ import annotations

import random

from prefixtune.data import batch_order, epoch_order


def _padded(order, lengths, batch_size):
    """Tokens computed (padding included) over the epoch's full batches."""
    full = len(order) // batch_size * batch_size
    return sum(max(lengths[i] for i in order[s : s + batch_size]) * batch_size for s in range(0, full, batch_size))


def test_grouped_order_keeps_the_same_rows_and_drops_the_same_remainder():
    lengths = [random.Random(1).randint(20, 100) for _ in range(307)]
    plain = epoch_order(len(lengths), 3, 2)
    grouped = batch_order(lengths, 10, 3, 2)
    assert sorted(grouped) == list(range(307))
    assert grouped[300:] == plain[300:]  # the rows a full-batch epoch leaves out are unchanged
    assert sorted(grouped[:300]) == sorted(plain[:300])
    assert batch_order(lengths, 10, 3, 2, group_by_length=False) == plain


def test_grouped_order_pads_less_and_still_varies_by_epoch():
    rng = random.Random(0)
    lengths = [rng.randint(40, 100) for _ in range(300)]
    plain = _padded(epoch_order(300, 0, 0), lengths, 10)
    grouped = _padded(batch_order(lengths, 10, 0, 0), lengths, 10)
    assert grouped < 0.9 * plain, (grouped, plain)
    epoch0 = {frozenset(batch_order(lengths, 10, 0, 0)[s : s + 10]) for s in range(0, 300, 10)}
    epoch1 = {frozenset(batch_order(lengths, 10, 0, 1)[s : s + 10]) for s in range(0, 300, 10)}
    assert epoch0 != epoch1
    assert batch_order(lengths, 10, 0, 1) == batch_order(lengths, 10, 0, 1)
