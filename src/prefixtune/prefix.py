"""The prefix itself: its parametrisation during training, and its materialised key/value form.

Layout of one role's flat prefix P, (L, width): for every layer in order, the key then the value, each
(KVH * D) numbers per position -- the same layout as PEFT's `prompt_embeddings`, so PEFT checkpoints
map onto it directly. Materialised, each slot holds (key, value) of shape (KVH, L, D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .inject import KV, PrefixBatch, Slot

LayerShape = tuple[int, int]  # (key/value heads, head dim)


@dataclass
class PrefixKV:
    """A materialised prefix: kv[slot] = (key, value), each (KVH, L, D)."""

    kv: dict[Slot, KV]
    infix: bool = False
    """True for the infix ablation [x; INFIX; y]: only the separator and target tokens attend to it."""

    @property
    def length(self) -> int:
        return int(next(iter(self.kv.values()))[0].shape[1])

    def shapes(self) -> dict[Slot, LayerShape]:
        return {s: (int(k.shape[0]), int(k.shape[2])) for s, (k, _) in self.kv.items()}

    def detach(self) -> "PrefixKV":
        return PrefixKV({s: (k.detach(), v.detach()) for s, (k, v) in self.kv.items()}, self.infix)

    def to(self, device=None, dtype=None) -> "PrefixKV":
        return PrefixKV({s: (k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype))
                         for s, (k, v) in self.kv.items()}, self.infix)

    def num_parameters(self) -> int:
        return sum(k.numel() + v.numel() for k, v in self.kv.values())


def roles(slots: Sequence[Slot]) -> list[str]:
    """Roles in first-seen order ("self"; or "encoder", "self", "cross")."""
    return list(dict.fromkeys(r for r, _ in slots))


def unflatten(flat: torch.Tensor, role: str, shapes: Sequence[LayerShape]) -> dict[Slot, KV]:
    """(L, width) flat prefix of one role -> {(role, layer): (key, value)} each (KVH, L, D)."""
    out, offset, length = {}, 0, flat.shape[0]
    for layer, (heads, dim) in enumerate(shapes):
        chunk = flat[:, offset : offset + 2 * heads * dim].reshape(length, 2, heads, dim).permute(1, 2, 0, 3)
        out[(role, layer)] = (chunk[0], chunk[1])
        offset += 2 * heads * dim
    if offset != flat.shape[1]:
        raise ValueError(f"flat prefix of width {flat.shape[1]} does not match layer shapes of width {offset}")
    return out


def flatten(kv: dict[Slot, KV], role: str) -> torch.Tensor:
    """Inverse of `unflatten` for one role: -> (L, width)."""
    layers = sorted(layer for r, layer in kv if r == role)
    parts = []
    for layer in layers:
        k, v = kv[(role, layer)]
        parts.append(torch.stack([k, v]).permute(2, 0, 1, 3).reshape(k.shape[1], -1))
    return torch.cat(parts, dim=1)


class PrefixEncoder(nn.Module):
    """One role's trainable prefix: P = MLP(P') ("mlp") or P itself ("table").

    MLP = Linear(d_model, hidden) -> tanh -> Linear(hidden, width), as in the paper's code; P' is an
    (L, d_model) embedding.
    """

    def __init__(self, length: int, width: int, d_model: int, reparam: str, hidden: int):
        super().__init__()
        self.reparam = reparam
        if reparam == "mlp":
            self.embedding = nn.Parameter(torch.randn(length, d_model))
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, width))
        elif reparam == "table":
            self.table = nn.Parameter(torch.randn(length, width))
        else:
            raise ValueError(f"PrefixEncoder reparam must be 'mlp' or 'table', got {reparam!r}")

    def forward(self) -> torch.Tensor:
        """-> (L, width)."""
        if self.reparam == "mlp":
            return self.mlp(self.embedding)
        return self.table

    @torch.no_grad()
    def fit(self, target: torch.Tensor, steps: int, lr: float) -> float:
        """Make the output match `target` (L, width): copy for a table, MSE-fit the MLP (the paper's code).

        Returns the final mean squared error.
        """
        if self.reparam == "table":
            self.table.copy_(target)
            return 0.0
        self.mlp[2].bias.copy_(target.mean(0))  # start at the mean activation; the fit learns the rest
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        loss = torch.tensor(0.0)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(self(), target)
                loss.backward()
                opt.step()
        return float(torch.nn.functional.mse_loss(self(), target))


def stack(prefixes: Sequence[PrefixKV | None], slots: Sequence[Slot], shapes: dict[Slot, LayerShape],
          device=None, dtype=torch.float32, visible_from: torch.Tensor | None = None) -> PrefixBatch:
    """One `PrefixBatch` from per-row prefixes of any lengths (None: that row runs without a prefix).

    Rows are padded to the longest prefix with masked slots; shorter rows' real slots come first.
    visible_from (B,): first sequence index that sees the row's prefix (infix rows), else None.
    """
    lengths = [0 if p is None else p.length for p in prefixes]
    longest = max(lengths + [1])
    b = len(prefixes)
    mask = torch.zeros(b, longest, dtype=torch.bool, device=device)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    kv = {}
    for slot in slots:
        heads, dim = shapes[slot]
        key = torch.zeros(b, heads, longest, dim, device=device, dtype=dtype)
        value = torch.zeros_like(key)
        for i, p in enumerate(prefixes):
            if p is not None:
                k, v = p.kv[slot]
                key[i, :, : k.shape[1]] = k
                value[i, :, : v.shape[1]] = v
        kv[slot] = (key, value)
    return PrefixBatch(kv=kv, mask=mask, visible_from=visible_from)


def row_offsets(prefixes: Sequence[PrefixKV | None], width: int, device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(offsets, infix boundary) of left-padded rows `width` tokens wide, for `inject.position_ids`.

    offsets (B,): each row's prefix length (its first real token's position). boundary (B,) or None when no
    row is an infix: the last prompt token (the separator) and all generated tokens see an infix.
    """
    offsets = torch.tensor([0 if p is None else p.length for p in prefixes], device=device)
    if not any(p is not None and p.infix for p in prefixes):
        return offsets, None
    boundary = torch.tensor([width - 1 if p is not None and p.infix else 0 for p in prefixes], device=device)
    return offsets, boundary


def broadcast(prefix: PrefixKV, batch_size: int, visible_from: torch.Tensor | None = None) -> PrefixBatch:
    """The same (possibly trainable) prefix for every row, without copying: gradients flow through."""
    kv = {s: (k.unsqueeze(0).expand(batch_size, *k.shape), v.unsqueeze(0).expand(batch_size, *v.shape))
          for s, (k, v) in prefix.kv.items()}
    k0 = next(iter(prefix.kv.values()))[0]
    mask = torch.ones(batch_size, prefix.length, dtype=torch.bool, device=k0.device)
    return PrefixBatch(kv=kv, mask=mask, visible_from=visible_from)
