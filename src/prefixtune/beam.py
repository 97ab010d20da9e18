"""Batched beam search that stops computing a source as soon as its beams are done.

transformers' beam search runs every row of a batch until the last source has finished: on the E2E test
set in batches of 32 sources, about a fifth of its row-steps belonged to sources whose result could no
longer change. This is the same algorithm -- transformers' own selection steps (`_get_top_k_continuations`,
`_update_finished_beams`, ...), logits processors and stopping criteria -- run on the live sources only:
when a source is done, its rows leave the model's batch (cache, mask, positions and prefixes follow).
Tested token for token against `generate` (tests/test_beam.py); the helpers are transformers 5.x
internals, so a release that changes them fails that test rather than silently decoding differently.

Shapes: B live sources, n beams, rows = B * n; sequences (B, n, max_length).
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, StoppingCriteriaList

from . import _compat, inject

#: generate() keywords this search implements; anything else goes to transformers' own generate.
SUPPORTED = {"num_beams", "max_new_tokens", "min_new_tokens", "do_sample", "length_penalty", "early_stopping",
             "eos_token_id", "pad_token_id", "bad_words_ids", "num_return_sequences", "position_ids"}


def supported(kwargs: dict) -> bool:
    """True for deterministic beam search with options this module implements (plain token output)."""
    return (set(kwargs) <= SUPPORTED and int(kwargs.get("num_beams") or 1) > 1 and not kwargs.get("do_sample")
            and kwargs.get("max_new_tokens") is not None)


class _State:
    """Per-source beam state, (B, ...) tensors as in transformers' `_beam_search`."""

    NAMES = ("running", "sequences", "running_scores", "scores", "finished", "improvable", "running_idx", "idx")

    def __init__(self, base, input_ids: torch.Tensor, n: int, max_length: int, fill: int):
        b, t = input_ids.shape[0] // n, input_ids.shape[1]
        dev = input_ids.device
        self.running = torch.full((b, n, max_length), fill, dtype=torch.int64, device=dev)
        self.running[:, :, :t] = base._unflatten_beam_dim(input_ids, b, n)
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros((b, n), device=dev)
        self.running_scores[:, 1:] = -1e9  # only the first beam's tokens count at the first step
        self.scores = torch.full((b, n), -1e9, device=dev)
        self.finished = torch.zeros((b, n), dtype=torch.bool, device=dev)
        self.improvable = torch.ones((b, 1), dtype=torch.bool, device=dev)
        self.running_idx = torch.full((b, n, max_length - t), -1, dtype=torch.int32, device=dev)
        self.idx = self.running_idx.clone()

    def keep(self, live: torch.Tensor) -> None:
        for name in self.NAMES:
            setattr(self, name, getattr(self, name)[live])

    def advance(self, base, log_probs: torch.Tensor, cur: int, t: int, config, stopping) -> torch.Tensor:
        """One step of transformers' beam search on processed log-probs (rows, V); returns the sources
        that are done: every slot holds a finished hypothesis that nothing can displace any more
        (transformers then adds -1e9 to each new candidate of theirs, see `_update_finished_beams`)."""
        b, n = self.running.shape[:2]
        eos = config._eos_token_tensor
        keep_k = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * n
        log_probs = (base._unflatten_beam_dim(log_probs, b, n) + self.running_scores[:, :, None]).reshape(b, -1)
        top_lp, top_seq, top_idx = base._get_top_k_continuations(
            accumulated_log_probs=log_probs, running_sequences=self.running, running_beam_indices=self.running_idx,
            cur_len=cur, decoder_prompt_len=t, do_sample=False, beams_to_keep=keep_k, num_beams=n, batch_size=b)
        hits = base._unflatten_beam_dim(stopping(base._flatten_beam_dim(top_seq[:, :, : cur + 1]), None), b, keep_k)
        self.running, self.running_scores, self.running_idx = base._get_running_beams_for_next_iteration(
            topk_log_probs=top_lp, topk_running_sequences=top_seq, topk_running_beam_indices=top_idx,
            next_token_hits_stopping_criteria=hits, num_beams=n)
        self.sequences, self.scores, self.idx, self.finished = base._update_finished_beams(
            sequences=self.sequences, topk_running_sequences=top_seq, beam_scores=self.scores, topk_log_probs=top_lp,
            beam_indices=self.idx, topk_running_beam_indices=top_idx, is_early_stop_heuristic_unsatisfied=self.improvable,
            is_sent_finished=self.finished, next_token_hits_stopping_criteria=hits,
            top_num_beam_mask=torch.arange(keep_k, device=hits.device) < n, num_beams=n, cur_len=cur,
            decoder_prompt_len=t, length_penalty=config.length_penalty, early_stopping=config.early_stopping)
        self.improvable = base._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.improvable, running_beam_scores=self.running_scores,
            beam_scores=self.scores, is_sent_finished=self.finished, cur_len=cur + 1, max_length=config.max_length,
            decoder_prompt_len=t, early_stopping=config.early_stopping, length_penalty=config.length_penalty)
        done = self.finished.all(-1) & ((config.early_stopping is True) | ~self.improvable[:, 0])
        if bool(torch.all(hits)) or cur + 1 >= config.max_length:  # transformers stops the whole batch here
            done[:] = True
        return done


def _select_rows(batch: inject.PrefixBatch | None, live: torch.Tensor) -> inject.PrefixBatch | None:
    """The prefixes of the live sources (a PrefixBatch holds one row per source)."""
    if batch is None:
        return None
    vis = None if batch.visible_from is None else batch.visible_from[live]
    return inject.PrefixBatch(kv={s: (k[live], v[live]) for s, (k, v) in batch.kv.items()}, mask=batch.mask[live],
                              visible_from=vis, in_cache=batch.in_cache)


@torch.no_grad()
def beam_search(base: PreTrainedModel, batch: inject.PrefixBatch | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, cache, kwargs: dict) -> torch.Tensor:
    """Prompt + generated ids, (B * num_return_sequences, T + new), as `base.generate(**kwargs)` returns them.

    `cache` holds every row's prompt but its last token, already repeated num_beams times per source
    (generate.prompt_cache); `batch` is the sources' PrefixBatch (or None). Decoder-only models.
    """
    kwargs = dict(kwargs)
    positions = kwargs.pop("position_ids")
    t = input_ids.shape[1]
    config, processors = _compat.generation_setup(base, kwargs, t, input_ids.device)
    stopping = base._get_stopping_criteria(config, StoppingCriteriaList())
    n = config.num_beams
    pad, eos = config._pad_token_tensor, config._eos_token_tensor  # transformers' fill: (pad or eos[0]) if eos
    fill = -1 if eos is None else int(pad if pad is not None and int(pad) != 0 else eos.reshape(-1)[0])

    def rows(x: torch.Tensor) -> torch.Tensor:  # source rows -> beam rows, each repeated in place
        return x.repeat_interleave(n, 0)

    st = _State(base, rows(input_ids), n, config.max_length, fill)
    done_seq, done_idx = st.sequences.clone(), st.idx.clone()  # results by original source index
    source = torch.arange(input_ids.shape[0], device=input_ids.device)  # original index of each live source
    mask, pos, step_ids = rows(attention_mask), rows(positions)[:, -1:], rows(input_ids)[:, -1:]
    cur = t
    while True:
        with inject.active(batch):
            logits = base(input_ids=step_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=True).logits[:, -1, :].float()
        flat = base._flatten_beam_dim(st.running[:, :, :cur])
        done = st.advance(base, processors(flat, torch.nn.functional.log_softmax(logits, dim=-1)), cur, t, config,
                          stopping)
        cache.reorder_cache(base._flatten_beam_dim(st.running_idx[..., cur - t]))
        cur += 1
        if bool(done.any()):
            gone = source[done]
            done_seq[gone], done_idx[gone] = st.sequences[done], st.idx[done]
            live = ~done
            if not bool(live.any()):
                break
            source = source[live]
            st.keep(live)
            row_live = live.repeat_interleave(n)
            cache.batch_select_indices(row_live.nonzero()[:, 0])
            mask, pos = mask[row_live], pos[row_live]
            batch = _select_rows(batch, live)
        step_ids = base._flatten_beam_dim(st.running[:, :, cur - 1 : cur])
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos + 1
    r = config.num_return_sequences or 1
    sequences = base._flatten_beam_dim(done_seq[:, :r, :])
    generated = ((base._flatten_beam_dim(done_idx[:, :r, :]) + 1).bool()).sum(dim=1).max()
    return sequences[:, : t + int(generated)]
