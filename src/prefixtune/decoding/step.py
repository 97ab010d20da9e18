"""Greedy and sampling: the selection policy of requests that decode one lane each.

transformers' own logits processors pick tokens (greedy equals `generate`). Processors are built once per
options and called on the generated tokens only (prompt length 0): every option the engine accepts is
independent of the prompt's content (request.SUPPORTED), so rows of different prompts and prompt lengths
share one call. Sampling draws from a generator per request, so a seeded request does not depend on its
neighbours in the batch.
"""

from __future__ import annotations

import torch

from .request import Request


class StepGroup:
    """Greedy/sampling requests, one lane each; a lane leaves when its request ends or is cancelled."""

    def __init__(self, engine, requests: list[Request]):
        self.engine = engine
        self.requests = list(requests)
        # (GenerationConfig, processors, end-of-text ids) per options: built once, looked up every step
        self.options = {}
        for r in self.requests:
            if r.key not in self.options:
                config, processors, _ = engine.setup(r.kwargs, 0)
                self.options[r.key] = (config, processors, engine.eos_ids(config))
            if r.kwargs.get("do_sample"):
                seed = r.seed if r.seed is not None else int(torch.randint(0, 2**62, (1,)))
                r.generator = torch.Generator(engine.device).manual_seed(seed)

    @property
    def lanes(self) -> int:
        return len(self.requests)

    def cancelled(self) -> torch.Tensor:
        """(lanes,) True where the lane's request was cancelled; those requests leave the group."""
        gone = torch.tensor([r.cancelled for r in self.requests], dtype=torch.bool)
        self.requests = [r for r in self.requests if not r.cancelled]
        return gone

    def select(self, logits: torch.Tensor):
        """Choose every lane's next token from its logits (lanes, V).

        Returns (None: lanes keep their order, keep (lanes,) bool, next ids of the kept lanes)."""
        tokens = [0] * len(self.requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.requests):
            groups.setdefault((r.key, len(r.tokens)), []).append(i)
        for rows in groups.values():
            first = self.requests[rows[0]]
            processors = self.options[first.key][1]
            device = logits.device
            seen = torch.tensor([self.requests[i].tokens for i in rows], dtype=torch.long, device=device)
            seen = seen.reshape(len(rows), len(first.tokens))
            scores = processors(seen, logits[rows])
            if first.kwargs.get("do_sample"):
                probs = torch.softmax(scores, dim=-1)
                for j, i in enumerate(rows):
                    tokens[i] = int(torch.multinomial(probs[j], 1, generator=self.requests[i].generator))
            else:
                for j, token in zip(rows, scores.argmax(dim=-1).tolist()):
                    tokens[j] = token
        keep, live = [], []
        for r, token in zip(self.requests, tokens):
            r.tokens.append(token)
            if r.on_token is not None:
                r.on_token(r, token)
            config, _, eos = self.options[r.key]
            ended = token in eos or len(r.tokens) >= config.max_new_tokens
            keep.append(not ended)
            if ended:
                r.outputs = [list(r.tokens)]
                if r.on_done is not None:
                    r.on_done(r)
            else:
                live.append(r)
        self.requests = live
        next_ids = torch.tensor([t for t, k in zip(tokens, keep) if k], dtype=torch.long)
        return None, torch.tensor(keep, dtype=torch.bool), next_ids
