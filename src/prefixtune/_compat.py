"""Architecture and transformers-version quirks, and nothing else.

Everything that depends on how a particular model family or a particular transformers release names or
wires its attention lives here, so that `inject.py` can stay architecture-free.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: model_type -> family name shown to users. Each one is covered by the tests on a tiny random model.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "gpt2": "GPT-2",
    "llama": "Llama (incl. SmolLM2, grouped-query attention)",
    "opt": "OPT",
    "qwen2": "Qwen2",
    "gpt_neox": "GPT-NeoX (Pythia)",
    "gemma": "Gemma",
    "phi3": "Phi-3",
    "bart": "BART (encoder-decoder)",
    "t5": "T5 (encoder-decoder)",
}

#: Submodule names of decoder cross-attention in the supported encoder-decoder families.
_CROSS_ATTENTION_NAMES = ("encoder_attn", "EncDecAttention", "crossattention")


#: The transformers release every private name below was checked against (tests/test_compat.py fails
#: loudly when the installed release behaves differently).
CHECKED_TRANSFORMERS = "5.23.0"

#: Base class of our decoding cache layer (decoding/cache.py). We rely on its `keys`/`values` tensors
#: (rows, KVH, T, D), `lazy_initialization`, `crop`, and on DynamicCache calling each layer's
#: `update`, `get_seq_length`, `reorder_cache`, `batch_select_indices` and `batch_repeat_interleave`.
CacheLayerBase = DynamicLayer


def new_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty DynamicCache laid out for `model` (one layer per decoder layer, sliding ones marked)."""
    return DynamicCache(config=model.config)


def extend_position_bias(kwargs: dict, prefix_length: int) -> None:
    """T5 passes its relative position bias (B, H, q, k) to attention: prefix keys get zero bias."""
    bias = kwargs.get("position_bias")
    if bias is not None:
        kwargs["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:-1], prefix_length), bias], dim=-1)


class UnsupportedModelError(ValueError):
    """The base model's architecture is not one prefixtune knows how to prefix."""


def check_supported(model: PreTrainedModel) -> None:
    """Raise a clear error for an architecture we have not tested, naming the supported ones."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        families = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise UnsupportedModelError(
            f"model_type {model_type!r} ({type(model).__name__}) is not supported by prefixtune. "
            f"Supported model types: {families}."
        )


def is_encoder_decoder(model: PreTrainedModel) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def attention_modules(model: PreTrainedModel) -> Iterator[tuple[str, str, nn.Module]]:
    """Yield `(qualified name, role, module)` for every attention module, in layer order.

    role is "self" (decoder self-attention, also of decoder-only models), "encoder" (encoder
    self-attention) or "cross" (decoder cross-attention). An attention module is the innermost module
    whose class name ends in "Attention": T5 wraps `T5Attention` in `T5LayerSelfAttention`, which is skipped.
    """
    enc_dec = is_encoder_decoder(model)
    for name, module in model.named_modules():
        if not type(module).__name__.endswith("Attention"):
            continue
        if any(type(child).__name__.endswith("Attention") for child in module.children()):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _CROSS_ATTENTION_NAMES:
            role = "cross"
        elif enc_dec and (".encoder." in f".{name}." or name.startswith("encoder")):
            role = "encoder"
        else:
            role = "self"
        if role == "cross" and not enc_dec:
            continue  # GPT-2's optional cross-attention is unused in decoder-only language modelling
        yield name, role, module


def embedding_dim(model: PreTrainedModel) -> int:
    """Width of the model's token embeddings (the MLP input size of the reparametrisation)."""
    return int(model.get_input_embeddings().embedding_dim)


def base_attention(module: nn.Module, implementation: str) -> Callable:
    """The attention function the model would have used without prefixes.

    "eager" lives in each model's own file (T5's adds its position bias), so it is looked up there.
    """
    if implementation == "eager":
        owner = sys.modules[type(module).__module__]
        return getattr(owner, "eager_attention_forward")
    return ALL_ATTENTION_FUNCTIONS[implementation]


def register_attention(name: str, fn: Callable) -> None:
    """Register `fn` as attention implementation `name`, with float 4D masks.

    transformers only builds masks for implementations listed in `AttentionMaskInterface`; an
    unlisted one receives `None`. eager masks are additive float tensors that we can extend with
    prefix columns whatever base implementation runs afterwards.
    """
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, eager_mask)


def set_attention_implementation(model: PreTrainedModel, name: str) -> None:
    """Switch the model (and its sub-configs, e.g. encoder/decoder) to implementation `name`."""
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise UnsupportedModelError(
            f"{type(model).__name__} refused attention implementation {name!r} "
            f"(it stays {model.config._attn_implementation!r}); prefixtune cannot inject prefixes into it."
        )


def float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Any transformers 4D mask (bool: True = attend, or additive float) as an additive float mask."""
    if mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)
    return mask.to(dtype)


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A GGUF-loaded model, already dequantized, as an ordinary serialisable model.

    transformers marks models loaded with `gguf_file=` as quantized and refuses `save_pretrained`;
    rebuilding from the config and copying the (float) weights lifts that.
    """
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = type(model)(config)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def backbone_and_head(model: PreTrainedModel) -> tuple[nn.Module, nn.Module]:
    """(decoder stack returning last_hidden_state, output projection) of a decoder-only LM.

    Training applies the head only at target positions: full-vocabulary logits over source tokens are
    wasted work (~15% of a SmolLM2 step). Valid for the supported families, none of which scales or
    soft-caps logits after the head.
    """
    return model.base_model, model.get_output_embeddings()


def checkpointing_without(model: PreTrainedModel, context_fn) -> bool:
    """True when activation checkpointing is on and would recompute without `context_fn`.

    transformers keeps the checkpoint function (a functools.partial of torch's checkpoint) on each
    GradientCheckpointingLayer; its keywords show whether our context_fn was passed.
    """
    if not (getattr(model, "is_activation_checkpointing", False) and model.training):
        return False
    for module in model.modules():
        fn = getattr(module, "_gradient_checkpointing_func", None)
        if fn is not None and getattr(module, "gradient_checkpointing", False):
            return getattr(fn, "keywords", {}).get("context_fn") is not context_fn
    return False


def enable_checkpointing(model: PreTrainedModel, context_fn) -> None:
    """Non-reentrant activation checkpointing whose recomputation runs inside `context_fn`'s context.

    transformers 5.x renamed gradient_checkpointing_enable to activation_checkpointing_enable."""
    kwargs = {"use_reentrant": False, "context_fn": context_fn}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def generation_setup(model: PreTrainedModel, kwargs: dict, prompt_length: int, device) -> tuple:
    """(GenerationConfig, LogitsProcessorList, StoppingCriteriaList) as `model.generate(**kwargs)` builds
    them for prompts of `prompt_length` tokens: model defaults merged with kwargs, lengths counted from the
    prompt's end, special tokens as tensors. For the decoding engine (decoding/); transformers 5.x internals.
    """
    from transformers import StoppingCriteriaList

    config, _ = model._prepare_generation_config(None, **kwargs)
    if config.max_new_tokens is not None:
        config.max_length = prompt_length + config.max_new_tokens
    if config.min_new_tokens is not None:
        config.min_length = prompt_length + config.min_new_tokens
    model._prepare_special_tokens(config, True, device=device)
    processors = model._get_logits_processor(config, input_ids_seq_length=prompt_length, device=device)
    return config, processors, model._get_stopping_criteria(config, StoppingCriteriaList())


def beam_search_step(model: PreTrainedModel, st, log_probs: torch.Tensor, cur: int, t: int, config,
                     stopping) -> None:
    """One step of transformers' `_beam_search` on `st` (decoding/beam.py `BeamState`, (B, n, ...) tensors)
    given processed log-probs (B, n * V) that already include the running scores: its own top-k,
    running-beam and finished-beam selection and its early-stop heuristic, in that order."""
    b, n = st.running.shape[:2]
    eos = config._eos_token_tensor
    keep_k = max(2, 1 + (eos.shape[0] if eos is not None else 0)) * n
    top_lp, top_seq, top_idx = model._get_top_k_continuations(
        accumulated_log_probs=log_probs, running_sequences=st.running, running_beam_indices=st.running_idx,
        cur_len=cur, decoder_prompt_len=t, do_sample=False, beams_to_keep=keep_k, num_beams=n, batch_size=b)
    hits = stopping(top_seq[:, :, : cur + 1].reshape(b * keep_k, -1), None).reshape(b, keep_k)
    st.running, st.running_scores, st.running_idx = model._get_running_beams_for_next_iteration(
        topk_log_probs=top_lp, topk_running_sequences=top_seq, topk_running_beam_indices=top_idx,
        next_token_hits_stopping_criteria=hits, num_beams=n)
    st.sequences, st.scores, st.idx, st.finished = model._update_finished_beams(
        sequences=st.sequences, topk_running_sequences=top_seq, beam_scores=st.scores, topk_log_probs=top_lp,
        beam_indices=st.idx, topk_running_beam_indices=top_idx, is_early_stop_heuristic_unsatisfied=st.improvable,
        is_sent_finished=st.finished, next_token_hits_stopping_criteria=hits,
        top_num_beam_mask=torch.arange(keep_k, device=hits.device) < n, num_beams=n, cur_len=cur,
        decoder_prompt_len=t, length_penalty=config.length_penalty, early_stopping=config.early_stopping)
    st.improvable = model._check_early_stop_heuristic(
        is_early_stop_heuristic_unsatisfied=st.improvable, running_beam_scores=st.running_scores,
        beam_scores=st.scores, is_sent_finished=st.finished, cur_len=cur + 1, max_length=config.max_length,
        decoder_prompt_len=t, early_stopping=config.early_stopping, length_penalty=config.length_penalty)
    st.all_hit = bool(torch.all(hits))


def logits_to_keep(model: PreTrainedModel) -> dict:
    """`logits_to_keep=1` where the model's forward takes it (as generate passes it): last position only."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
