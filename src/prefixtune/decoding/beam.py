"""Beam search: the selection policy of a cohort of sources that start together with equal options.

This is transformers' own beam search -- its selection steps (`_compat.beam_search_step`), logits
processors and stopping criteria -- with one change: a source whose hypotheses can no longer change leaves
the batch (its lanes leave the engine's cache), where transformers runs every row until the last source of
the batch has finished. Tested token for token against `generate` (tests/decoding/test_beam.py).

Shapes: B live sources, n beams, lanes = B * n; sequences (B, n, max_length) hold prompt + generated ids.
"""

from __future__ import annotations

import torch

from .. import _compat
from .request import Request


def beam_fill(config) -> int:
    """transformers' fill for unused positions of beam outputs: pad (or eos[0] when pad is 0 or unset),
    -1 when no end-of-text token is set."""
    pad, eos = config._pad_token_tensor, config._eos_token_tensor
    return -1 if eos is None else int(pad if pad is not None and int(pad) != 0 else eos.reshape(-1)[0])


class BeamState:
    """Per-source beam state, (B, ...) tensors as in transformers' `_beam_search`."""

    NAMES = ("running", "sequences", "running_scores", "scores", "finished", "improvable", "running_idx", "idx")

    def __init__(self, prompts: torch.Tensor, n: int, max_length: int, fill: int):
        b, t = prompts.shape
        dev = prompts.device
        self.running = torch.full((b, n, max_length), fill, dtype=torch.int64, device=dev)
        self.running[:, :, :t] = prompts[:, None, :]
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros((b, n), device=dev)
        self.running_scores[:, 1:] = -1e9  # only the first beam's tokens count at the first step
        self.scores = torch.full((b, n), -1e9, device=dev)
        self.finished = torch.zeros((b, n), dtype=torch.bool, device=dev)
        self.improvable = torch.ones((b, 1), dtype=torch.bool, device=dev)
        self.running_idx = torch.full((b, n, max_length - t), -1, dtype=torch.int32, device=dev)
        self.idx = self.running_idx.clone()
        self.all_hit = False

    def keep(self, live: torch.Tensor) -> None:
        for name in self.NAMES:
            setattr(self, name, getattr(self, name)[live])


class BeamGroup:
    """A cohort of beam-search requests with equal options, decoded as transformers decodes one batch."""

    def __init__(self, engine, requests: list[Request], prompts: torch.Tensor):
        self.engine, self.requests = engine, list(requests)
        self.t = self.cur = int(prompts.shape[1])
        self.config, self.processors, self.stopping = engine.setup(requests[0].kwargs, self.t)
        self.n = int(self.config.num_beams)
        self.state = BeamState(prompts, self.n, self.config.max_length, beam_fill(self.config))

    @property
    def lanes(self) -> int:
        return len(self.requests) * self.n

    def cancelled(self) -> torch.Tensor:
        """(lanes,) True for the lanes of cancelled sources; those sources leave the cohort."""
        gone = torch.tensor([r.cancelled for r in self.requests], dtype=torch.bool)
        if bool(gone.any()):
            self.state.keep(~gone.to(self.state.running.device))
            self.requests = [r for r in self.requests if not r.cancelled]
        return gone.repeat_interleave(self.n)

    def select(self, logits: torch.Tensor):
        """One beam-search step on the cohort's logits (lanes, V).

        Returns (perm: lane i continues lane perm[i], keep (lanes,) bool after perm, next ids of kept lanes).
        """
        st, n, cur, t = self.state, self.n, self.cur, self.t
        b = st.running.shape[0]
        seen = st.running[:, :, :cur].reshape(b * n, cur)
        log_probs = self.processors(seen, torch.nn.functional.log_softmax(logits, dim=-1))
        log_probs = (log_probs.view(b, n, -1) + st.running_scores[:, :, None]).reshape(b, -1)
        _compat.beam_search_step(self.engine.base, st, log_probs, cur, t, self.config, self.stopping)
        done = st.finished.all(-1) & ((self.config.early_stopping is True) | ~st.improvable[:, 0])
        if st.all_hit or cur + 1 >= self.config.max_length:  # transformers stops the whole batch here
            done[:] = True
        perm = st.running_idx[..., cur - t].reshape(-1).long()
        self.cur = cur + 1
        for i in done.nonzero()[:, 0].tolist():
            self._finish(i)
        live = ~done
        st.keep(live)
        self.requests = [r for r, alive in zip(self.requests, live.tolist()) if alive]
        next_ids = st.running[:, :, self.cur - 1].reshape(-1)
        return perm, live.repeat_interleave(n).cpu(), next_ids

    def _finish(self, i: int) -> None:
        """Source i's best `num_return_sequences` hypotheses as lists of generated ids."""
        r, st = self.requests[i], self.state
        count = int(self.config.num_return_sequences or 1)
        lengths = (st.idx[i, :count] >= 0).sum(-1).tolist()
        r.outputs = [st.sequences[i, j, self.t : self.t + lengths[j]].tolist() for j in range(count)]
        if r.on_done is not None:
            r.on_done(r)
