"""The decoding engine: a batch of lanes decoded step by step over a cache that holds each lane's prefix.

A lane is one row of the model's batch: a greedy or sampling request has one, a beam-search source one per
beam. Groups of lanes choose their tokens by their own policy (step.StepGroup, beam.BeamGroup); every step
runs one forward pass over all lanes of all groups, whatever their tasks and options. Requests join
between steps: their prompts run once per source (all but the last token) into a cache of their own,
which is merged into the running one; lanes leave when their request ends. Each lane's logits depend only
on its own tokens, prefix and positions (padding columns get an exactly zero attention weight), so a
request decodes as it would alone: `generate_ids`, `generate_texts` and the server all run here.

Invariants between steps (lanes N, prefix width L, real columns T):
- cache: one `PrefixedCacheLayer` per layer, (N, KVH, L + T - 1, D): prefix, then T - 1 real columns;
- mask (N, T): real columns of the cache plus the column of the token fed next (left padding = 0);
- prefix_mask (N, L): the lane's real prefix slots (an infix is seen by every query from the last prompt
  token on, so once the prompt is prefilled, infix lanes need no mask of their own);
- pos (N,): position of the token fed next; next_ids (N,): that token.
Decoder-only models whose layers can hold a prefix in their cache (no sliding windows).
"""

from __future__ import annotations

import weakref

import torch
from transformers import PreTrainedModel

from .. import _compat, inject
from ..prefix import row_offsets, stack
from .beam import BeamGroup
from .cache import merge, prefixed_cache, trim_left
from .request import Request, left_pad
from .step import StepGroup

#: model -> whether the engine can run it (Engine.can_run); weak, so a model's entry goes with the model
_RUNNABLE: "weakref.WeakKeyDictionary[PreTrainedModel, bool]" = weakref.WeakKeyDictionary()
#: Columns that are padding in every lane are cut once there are at least this many (a full cache copy).
_TRIM_AT = 32


class Engine:
    """Runs requests of any tasks and options together on one frozen decoder-only model."""

    def __init__(self, base: PreTrainedModel):
        if not self.can_run(base):
            raise ValueError(f"{type(base).__name__}: the decoding engine needs a decoder-only model whose cache "
                             "layers can hold a prefix (no sliding-window layers)")
        self.base = base
        self.slots, self.shapes = inject.prepare(base)
        self.self_slots = [s for s in self.slots if s[0] == "self"]
        self.device = next(base.parameters()).device
        self.forward_extra = _compat.logits_to_keep(base)
        self._setups: dict[tuple, tuple] = {}
        self.reset()

    def reset(self) -> None:
        """Forget every running request (after a failed step, whose batch state cannot be trusted)."""
        self.groups = []
        self.cache = self.mask = self.prefix_mask = self.pos = self.next_ids = None

    @staticmethod
    def can_run(base: PreTrainedModel) -> bool:
        """Decoder-only without sliding-window cache layers; answered once per model (each `generate_ids` call
        asks, and the answer needs an empty cache built for the model)."""
        if base not in _RUNNABLE:
            _RUNNABLE[base] = not _compat.is_encoder_decoder(base) and not any(
                getattr(layer, "is_sliding", False) for layer in _compat.new_cache(base).layers)
        return _RUNNABLE[base]

    # --- options ------------------------------------------------------------------------------------
    def setup(self, kwargs: dict, prompt_length: int) -> tuple:
        """(GenerationConfig, processors, stopping criteria) for these options and prompt length, cached."""
        key = (tuple(sorted((k, id(v) if isinstance(v, list) else v) for k, v in kwargs.items())), prompt_length)
        if key not in self._setups:
            if len(self._setups) > 1024:
                self._setups.clear()
            self._setups[key] = _compat.generation_setup(self.base, dict(kwargs), prompt_length, self.device)
        return self._setups[key]

    @staticmethod
    def eos_ids(config) -> set[int]:
        eos = config._eos_token_tensor
        return set() if eos is None else set(eos.reshape(-1).tolist())

    # --- membership ---------------------------------------------------------------------------------
    @property
    def lanes(self) -> int:
        return sum(g.lanes for g in self.groups)

    @property
    def requests(self) -> list[Request]:
        return [r for g in self.groups for r in g.requests]

    @torch.no_grad()
    def add(self, requests: list[Request]) -> None:
        """Prefill `requests` and join them to the running batch: greedy/sampling requests as one lane
        each, beam-search requests as one cohort per distinct options."""
        step = [r for r in requests if r.num_beams == 1]
        cohorts: dict[tuple, list[Request]] = {}
        for r in requests:
            if r.num_beams > 1:
                cohorts.setdefault(r.key, []).append(r)
        if step:
            self._join(step, 1, lambda prompts: StepGroup(self, step))
        for members in cohorts.values():
            self._join(members, members[0].num_beams, lambda prompts, m=members: BeamGroup(self, m, prompts))

    def _join(self, requests: list[Request], copies: int, make_group) -> None:
        """Prefill and merge `requests` as one group. All or nothing: whatever raises (options, seeds, a prefix
        that does not fit) leaves the running batch as it was, so the caller can retry requests one by one."""
        ids, mask = left_pad([r.prompt for r in requests], 0)  # pad columns are masked: any id will do
        ids, mask = ids.to(self.device), mask.to(self.device)
        group = make_group(ids)  # before any state changes: building it checks the options and seeds
        state = self._prefill(requests, ids, mask)
        if copies > 1:  # each source's lanes are consecutive copies (beam search reorders within them)
            state["cache"].batch_repeat_interleave(copies)
            state = {k: v if k == "cache" else v.repeat_interleave(copies, 0) for k, v in state.items()}
        self._merge(state)
        self.groups.append(group)

    def _prefill(self, requests: list[Request], ids: torch.Tensor, mask: torch.Tensor) -> dict:
        """Run every prompt but its last token over a cache that starts with the rows' prefixes."""
        prefixes = [r.prefix for r in requests]
        offsets, boundary = row_offsets(prefixes, ids.shape[1], self.device)
        given = next((p for p in prefixes if p is not None), None)
        dtype = torch.float32 if given is None else next(iter(given.kv.values()))[0].dtype
        batch = stack(prefixes, self.self_slots, self.shapes, device=self.device, dtype=dtype, visible_from=boundary)
        positions = inject.position_ids(mask, offsets, boundary)
        cache = prefixed_cache(self.base, [batch.kv[s] for s in self.self_slots])
        batch.in_cache = True
        if ids.shape[1] >= 2:
            with inject.active(batch):
                self.base.base_model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1],
                                     position_ids=positions[:, :-1], past_key_values=cache, use_cache=True)
        return {"cache": cache, "mask": mask, "prefix_mask": batch.mask, "pos": positions[:, -1],
                "next_ids": ids[:, -1]}

    def _merge(self, new: dict) -> None:
        """Append prefilled lanes to the running ones, left-padding whichever has fewer real columns."""
        if self.cache is None:
            self.__dict__.update(new)
            return
        a, b = self.mask.shape[1], new["mask"].shape[1]
        width = max(a, b)
        pad = lambda m, n: torch.nn.functional.pad(m, (n, 0))  # noqa: E731
        plen = max(self.prefix_mask.shape[1], new["prefix_mask"].shape[1])
        right = lambda m: torch.nn.functional.pad(m, (0, plen - m.shape[1]), value=False)  # noqa: E731
        merged = {"cache": merge(self.base, self.cache, new["cache"]),  # a new cache: the running one is untouched
                  "mask": torch.cat([pad(self.mask, width - a), pad(new["mask"], width - b)]),
                  "prefix_mask": torch.cat([right(self.prefix_mask), right(new["prefix_mask"])]),
                  "pos": torch.cat([self.pos, new["pos"]]), "next_ids": torch.cat([self.next_ids, new["next_ids"]])}
        self.__dict__.update(merged)  # only once everything is built, so a failure leaves the batch as it was

    def _select(self, perm: torch.Tensor | None, keep: torch.Tensor | None) -> None:
        """Lane i continues lane perm[i]; then only the lanes where keep is True stay."""
        names = ("mask", "prefix_mask", "pos")
        if perm is not None:
            self.cache.reorder_cache(perm)
            for name in names:
                setattr(self, name, getattr(self, name)[perm])
        if keep is not None:
            index = keep.nonzero()[:, 0].to(self.device)
            if index.numel() == 0:
                self.cache = self.mask = self.prefix_mask = self.pos = self.next_ids = None
                return
            self.cache.batch_select_indices(index)
            for name in names:
                setattr(self, name, getattr(self, name)[index])
            start = int(self.mask.any(dim=0).long().argmax())
            if start >= _TRIM_AT:
                trim_left(self.cache, start)
                self.mask = self.mask[:, start:]

    # --- decoding -----------------------------------------------------------------------------------
    def _drop_cancelled(self) -> None:
        gone = torch.cat([g.cancelled() for g in self.groups]) if self.groups else torch.zeros(0, dtype=torch.bool)
        if bool(gone.any()):
            self.next_ids = self.next_ids[~gone.to(self.next_ids.device)]
            self._select(None, ~gone)
            self.groups = [g for g in self.groups if g.lanes]

    @torch.no_grad()
    def step(self) -> None:
        """One token for every lane; requests that end leave, with their lanes."""
        self._drop_cancelled()
        if not self.groups:
            return
        batch = inject.PrefixBatch(kv={}, mask=self.prefix_mask, in_cache=True)
        with inject.active(batch):
            out = self.base(input_ids=self.next_ids[:, None], attention_mask=self.mask,
                            position_ids=self.pos[:, None], past_key_values=self.cache, use_cache=True,
                            **self.forward_extra)
        logits = out.logits[:, -1, :].float()
        perms, keeps, next_ids, offset, moved = [], [], [], 0, False
        for group in self.groups:
            n = group.lanes
            perm, keep, nxt = group.select(logits[offset : offset + n])
            moved |= perm is not None
            perms.append(offset + (torch.arange(n, device=self.device) if perm is None else perm.to(self.device)))
            keeps.append(keep)
            next_ids.append(nxt.to(self.device))
            offset += n
        keep = torch.cat(keeps)
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos + 1
        self._select(torch.cat(perms) if moved else None, None if bool(keep.all()) else keep)
        self.next_ids = torch.cat(next_ids) if self.cache is not None else None
        self.groups = [g for g in self.groups if g.lanes]

    def run(self) -> None:
        """Step until every request has ended."""
        while self.groups:
            self.step()
