"""transformers-private names prefixtune relies on (all reached through _compat.py): a release that renames
or re-shapes them fails here, loudly, instead of decoding differently somewhere else."""

from __future__ import annotations

import inspect

import transformers

from conftest import tiny_model
from prefixtune import _compat


def test_the_checked_release_is_the_installed_one():
    assert transformers.__version__ == _compat.CHECKED_TRANSFORMERS, (
        f"transformers {transformers.__version__} is installed but _compat.py was checked against "
        f"{_compat.CHECKED_TRANSFORMERS}: rerun the suite, then update CHECKED_TRANSFORMERS")


def test_private_generation_steps_take_the_arguments_we_pass():
    model = tiny_model("llama")
    expected = {
        "_get_top_k_continuations": {"accumulated_log_probs", "running_sequences", "running_beam_indices", "cur_len",
                                     "decoder_prompt_len", "do_sample", "beams_to_keep", "num_beams", "batch_size"},
        "_get_running_beams_for_next_iteration": {"topk_log_probs", "topk_running_sequences",
                                                  "topk_running_beam_indices", "next_token_hits_stopping_criteria",
                                                  "num_beams"},
        "_update_finished_beams": {"sequences", "topk_running_sequences", "beam_scores", "topk_log_probs",
                                   "beam_indices", "topk_running_beam_indices", "is_early_stop_heuristic_unsatisfied",
                                   "is_sent_finished", "next_token_hits_stopping_criteria", "top_num_beam_mask",
                                   "num_beams", "cur_len", "decoder_prompt_len", "length_penalty", "early_stopping"},
        "_check_early_stop_heuristic": {"is_early_stop_heuristic_unsatisfied", "running_beam_scores", "beam_scores",
                                        "is_sent_finished", "cur_len", "max_length", "decoder_prompt_len",
                                        "early_stopping", "length_penalty"},
        "_prepare_generation_config": set(), "_prepare_special_tokens": set(), "_get_logits_processor": set(),
        "_get_stopping_criteria": set(),
    }
    for name, params in expected.items():
        fn = getattr(model, name, None)
        assert fn is not None, f"transformers no longer has GenerationMixin.{name}"
        missing = params - set(inspect.signature(fn).parameters)
        assert not missing, f"GenerationMixin.{name} no longer takes {sorted(missing)}"


def test_cache_layer_base_has_what_the_prefixed_layer_overrides():
    for name in ("update", "get_seq_length", "reorder_cache", "batch_select_indices", "batch_repeat_interleave",
                 "crop", "lazy_initialization"):
        assert callable(getattr(_compat.CacheLayerBase, name, None)), f"DynamicLayer.{name} is gone"
    cache = _compat.new_cache(tiny_model("llama"))
    assert len(cache.layers) == tiny_model("llama").config.num_hidden_layers
