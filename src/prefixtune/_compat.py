"""Architecture and transformers-version quirks, and nothing else.

Everything that depends on how a particular model family or a particular transformers release names or
wires its attention lives here, so that `inject.py` can stay architecture-free.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
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
    """(GenerationConfig, LogitsProcessorList) as `model.generate(**kwargs)` builds them for prompts of
    `prompt_length` tokens: model defaults merged with kwargs, lengths counted from the prompt's end,
    special tokens as tensors. For decoding loops of our own (beam.py, the serve batcher); these are
    transformers 5.x internals, so they are reached from here only.
    """
    config, _ = model._prepare_generation_config(None, **kwargs)
    if config.max_new_tokens is not None:
        config.max_length = prompt_length + config.max_new_tokens
    if config.min_new_tokens is not None:
        config.min_length = prompt_length + config.min_new_tokens
    model._prepare_special_tokens(config, True, device=device)
    return config, model._get_logits_processor(config, input_ids_seq_length=prompt_length, device=device)
