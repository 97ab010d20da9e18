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

from ._routes import ROUTES as _ROUTES
from ._routes import base_of as _routed_base
from ._routes import install as _install_route

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


#: `config.layer_types` entries whose layers are attention; any other kind of layer (linear attention,
#: state-space, convolution) mixes tokens outside attention, where no prefix reaches.
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})


def refused_feature(config) -> str | None:
    """The feature of `config` that meets a prefix and that prefixtune does not handle, described for the user.

    Handled, so not refused: sliding windows (`prefix_in_window`), attention soft-capping and explicit
    scaling (the model's own attention function runs over [prefix; real] keys), final-logit scaling and
    soft-capping (`backbone_and_head`), per-layer head counts (shapes are read per layer), mixture-of-experts
    routing without an expert capacity (routers see real tokens only; prefixes enter attention only).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    attn_config = getattr(text, "attn_config", None)
    if getattr(text, "alibi", False) or getattr(attn_config, "alibi", False):
        return ("ALiBi position biases (alibi=True): a prefix key has no distance to a query, so it has no "
                "defined ALiBi bias")
    if getattr(text, "attention_chunk_size", None):
        return (f"chunked local attention (attention_chunk_size={text.attention_chunk_size}): a prefix in front "
                "would move every chunk boundary")
    if getattr(text, "expert_capacity", None):
        return (f"mixture-of-experts routing with an expert capacity (expert_capacity={text.expert_capacity}): "
                "one row's tokens can push another row's out of an expert, so rows of a batch interact")
    other = sorted(set(getattr(text, "layer_types", None) or ()) - _ATTENTION_LAYER_TYPES)
    if other:
        return (f"layers of type {other}: prefixes reach attention layers only, and these layers mix tokens "
                "outside attention")
    return None


def model_class(config) -> type | None:
    """The transformers class prefixtune loads for `config`: its causal LM, or its seq2seq LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        return None


def check_config(config, name: str | None = None) -> None:
    """Refuse, from its config alone, a model whose attention prefixtune cannot prefix exactly.

    Any model works whose attention goes through transformers' AttentionInterface (what transformers
    itself requires to switch attention implementations), plus the few routed here (`_ROUTES`), unless
    it uses a feature named by `refused_feature`.
    """
    model_type = getattr(config, "model_type", None)
    what = f"model {name!r} (model_type {model_type!r})" if name else f"model_type {model_type!r}"
    feature = refused_feature(config)
    if feature is not None:
        raise UnsupportedModelError(f"{what} uses {feature}; prefixtune cannot add a prefix to it exactly")
    cls = model_class(config)
    if cls is None:
        raise UnsupportedModelError(
            f"{what} has no causal or sequence-to-sequence language-model class in transformers "
            f"{CHECKED_TRANSFORMERS}; prefixtune prefixes language models only")
    if model_type not in _ROUTES and not cls._can_set_attn_implementation():
        raise UnsupportedModelError(
            f"{what}: {cls.__name__} computes attention inside its own modules instead of through "
            "transformers' AttentionInterface, so prefixes cannot reach it. Use a model whose attention goes "
            "through the interface (the README lists the model types tested)")


def check_supported(model: PreTrainedModel) -> None:
    """`check_config`, then what only the built model shows: its attention modules and its logits."""
    check_config(model.config, type(model).__name__)
    found = list(attention_modules(model))
    if not found:
        raise UnsupportedModelError(f"found no attention modules in {type(model).__name__}: prefixes enter "
                                    "attention only")
    if is_encoder_decoder(model):
        return
    selfs = [(n, m) for n, role, m in found if role == "self"]
    bidirectional = [n for n, m in selfs if getattr(m, "is_causal", True) is False]
    if bidirectional:
        raise UnsupportedModelError(
            f"{type(model).__name__} has bidirectional self-attention ({bidirectional[0]}.is_causal is False): "
            "load a causal LM (for BERT-like models, a config with is_decoder=True) or an encoder-decoder model")
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    if layers is not None and len(selfs) != layers:
        raise UnsupportedModelError(
            f"{type(model).__name__} has {layers} layers but {len(selfs)} attention modules that prefixtune "
            "recognises: the other layers would not see the prefix")
    _check_head(model)


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

    "eager" lives in each model's own file (T5's adds its position bias, Gemma 2's its soft-capping), so it
    is looked up there; a routed module (`_routes.py`) has its own attention step.
    """
    routed = _routed_base(module)
    if routed is not None:
        return routed
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
    """Switch the model (and its sub-configs, e.g. encoder/decoder) to implementation `name`.

    A model that computes attention itself is first routed through the interface (`_routes.py`);
    transformers refuses to switch such a model, so its config is set directly.
    """
    route = _ROUTES.get(model.config.model_type)
    if route is not None and _install_route(model, route):
        model.config._attn_implementation = name
    else:
        model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise UnsupportedModelError(
            f"{type(model).__name__} refused attention implementation {name!r} "
            f"(it stays {model.config._attn_implementation!r}); prefixtune cannot inject prefixes into it."
        )


def prefix_in_window(module: nn.Module, kwargs: dict, prefix_mask: torch.Tensor, visible_from: torch.Tensor | None,
                     k_len: int) -> torch.Tensor | None:
    """(B, 1, q, L): which prefix slots the queries of a sliding-window layer still reach; None: all of them.

    A prefix counts as cached tokens at positions 0..n-1 before a row's first real token (at position n,
    `inject.position_ids`), so slot j leaves the window of a query at position p once p - j >= window,
    as transformers' window (`kv_idx > q_idx - window`) drops a cached token. Positions rather than
    indices, so left padding does not move the window. The window comes as the `sliding_window` argument
    that models give attention functions (for flash attention); Qwen2-MoE only sets it on the module.
    """
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    if not window or prefix_mask.shape[1] + k_len <= window:
        return None  # no full attention to cut, or a window that spans the prefix and every key
    if visible_from is not None:
        raise UnsupportedModelError(
            f"the infix ablation with a sliding window of {window} positions over {k_len} tokens: the window "
            "would also move over the source, which an infix cannot follow; use variant='prefix' or shorter inputs")
    positions = kwargs.get("position_ids")
    if positions is None:
        raise UnsupportedModelError(
            f"{type(module).__name__} has a sliding window of {window} positions but gives its attention no "
            "position_ids, so prefixtune cannot tell which prefix slots are still in the window; keep prefix "
            f"plus sequence within {window} tokens")
    slot = torch.arange(prefix_mask.shape[1], device=positions.device)
    return (positions[:, :, None] - slot[None, None, :] < int(window))[:, None]


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


def _logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What a causal LM's forward does to its output projection's result, or None: Cohere multiplies by
    `logit_scale`, Granite divides by `logits_scaling`, Gemma 2/3 soft-cap with `final_logit_softcapping`."""
    scale, divide = getattr(config, "logit_scale", None), getattr(config, "logits_scaling", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        return lambda logits: torch.tanh(logits / cap) * cap
    if scale is not None:
        return lambda logits: logits * scale
    if divide is not None:
        return lambda logits: logits / divide
    return None


class _ScaledHead(nn.Module):
    """The output projection followed by the model's own logit transform."""

    def __init__(self, head: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.head, self.transform = head, transform

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.transform(self.head(hidden))


def backbone_and_head(model: PreTrainedModel) -> tuple[nn.Module, nn.Module]:
    """(decoder stack returning last_hidden_state, head giving the model's own logits) of a decoder-only LM.

    Training applies the head only at target positions: full-vocabulary logits over source tokens are
    wasted work (~15% of a SmolLM2 step). `check_supported` refuses a model whose logits this head does not
    reproduce.
    """
    head = model.get_output_embeddings()
    transform = _logit_transform(model.config.get_text_config())
    return model.base_model, head if transform is None else _ScaledHead(head, transform)


def _check_head(model: PreTrainedModel) -> None:
    """`backbone_and_head` must give the model's logits: a forward that changes them after the output
    projection in a way not known here would train on other logits than the model decodes with."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    backbone, head = backbone_and_head(model)
    training = model.training
    model.eval()  # no dropout: both passes must compute the same thing
    try:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            ours = head(backbone(input_ids=ids, use_cache=False).last_hidden_state).float()
    finally:
        model.train(training)
    if ours.shape != full.shape or (ours - full).abs().max() > 1e-5 * (1 + full.abs().max()):
        raise UnsupportedModelError(
            f"{type(model).__name__} changes its logits after the output projection in a way prefixtune does "
            "not know (training computes target logits from the last hidden state and the output embeddings)")


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
