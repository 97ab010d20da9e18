"""The architectures prefixtune is proven on: one tiny random model per `model_type`, built from its config class.

This table is the one source of truth for the README's list of proven model types: `python tests/architectures.py`
rewrites that list from it, and tests/test_architectures.py fails when the README and this table differ.
Sliding-window models get a window of `WINDOW` positions, shorter than the test sequences, so the window
really does cut the prefix; soft-capping and logit scales are set low enough to change the outputs.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers

from conftest import EOS, PAD, VOCAB, tiny_config

#: Sliding window of the sliding-window models below, in positions (the tests run longer sequences).
WINDOW = 6

_SPECIAL = dict(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=258)
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **_SPECIAL)
_SEQ2SEQ = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
                decoder_start_token_id=EOS, forced_eos_token_id=None, **_SPECIAL)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)


@dataclass(frozen=True)
class Architecture:
    """One proven model type."""

    name: str
    """What the README calls it."""
    config: Callable[[], transformers.PretrainedConfig]
    """Builds the tiny random model's config."""
    features: str = ""
    """The attention features of this tiny model that meet a prefix (shown in the README)."""


def _family(family: str) -> Callable[[], transformers.PretrainedConfig]:
    return lambda: tiny_config(family)


ARCHITECTURES: dict[str, Architecture] = {a.config().model_type: a for a in [
    Architecture("GPT-2", _family("gpt2")),
    Architecture("Llama", _family("llama"), "grouped-query attention"),
    Architecture("Mistral", lambda: transformers.MistralConfig(**_LLAMA_LIKE, sliding_window=WINDOW),
                 "sliding window"),
    Architecture("Mixtral", lambda: transformers.MixtralConfig(**_LLAMA_LIKE, sliding_window=WINDOW, num_local_experts=4,
                                                               num_experts_per_tok=2),
                 "mixture of experts, sliding window"),
    Architecture("Qwen2", _family("qwen2")),
    Architecture("Qwen2-MoE", lambda: transformers.Qwen2MoeConfig(**_LLAMA_LIKE, **_MOE, shared_expert_intermediate_size=32),
                 "mixture of experts with a shared expert"),
    Architecture("Qwen3", lambda: transformers.Qwen3Config(**_LLAMA_LIKE, head_dim=16, use_sliding_window=True,
                                                           sliding_window=WINDOW, max_window_layers=1,
                                                           layer_types=["sliding_attention", "full_attention"]),
                 "query/key norms, explicit head_dim, one sliding-window layer"),
    Architecture("Qwen3-MoE", lambda: transformers.Qwen3MoeConfig(**_LLAMA_LIKE, **_MOE, head_dim=16),
                 "mixture of experts"),
    Architecture("Gemma", _family("gemma"), "multi-query attention"),
    Architecture("Gemma 2", lambda: transformers.Gemma2Config(**{**_LLAMA_LIKE, "num_key_value_heads": 1}, head_dim=16,
                                                              sliding_window=WINDOW, query_pre_attn_scalar=12,
                                                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
                 "attention and final-logit soft-capping, query_pre_attn_scalar, alternating sliding window"),
    Architecture("Gemma 3 text", lambda: transformers.Gemma3TextConfig(
        **_LLAMA_LIKE, head_dim=16, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=3.0),
                 "sliding and full layers with their own rotary bases, final-logit soft-capping"),
    Architecture("Phi", lambda: transformers.PhiConfig(**{**_LLAMA_LIKE, "num_key_value_heads": 4},
                                                       partial_rotary_factor=0.5),
                 "partial rotary, parallel attention and MLP"),
    Architecture("Phi-3", _family("phi3"), "fused qkv projection, partial rotary"),
    Architecture("OLMo", lambda: transformers.OlmoConfig(**_LLAMA_LIKE, clip_qkv=0.5), "clipped qkv"),
    Architecture("OLMo 2", lambda: transformers.Olmo2Config(**_LLAMA_LIKE), "query/key norms"),
    Architecture("Granite", lambda: transformers.GraniteConfig(**_LLAMA_LIKE, attention_multiplier=0.3,
                                                               logits_scaling=4.0, embedding_multiplier=2.0,
                                                               residual_multiplier=0.5),
                 "attention multiplier, logits scaling"),
    Architecture("StarCoder2", lambda: transformers.Starcoder2Config(**_LLAMA_LIKE, sliding_window=WINDOW),
                 "sliding window, biased projections"),
    Architecture("StableLM", lambda: transformers.StableLmConfig(**_LLAMA_LIKE, partial_rotary_factor=0.25,
                                                                 use_qkv_bias=True, qk_layernorm=True),
                 "partial rotary, per-head query/key norms"),
    Architecture("Cohere", lambda: transformers.CohereConfig(**_LLAMA_LIKE, logit_scale=0.5, use_qk_norm=True),
                 "logit scale, query/key norms"),
    Architecture("Falcon", lambda: transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, **_SPECIAL),
                 "multi-query attention computed inside the module (routed through AttentionInterface by prefixtune)"),
    Architecture("GPT-J", lambda: transformers.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                          n_positions=256, **_SPECIAL),
                 "interleaved partial rotary, attention computed inside the module (routed by prefixtune)"),
    Architecture("GPT-NeoX", _family("gpt_neox"), "partial rotary"),
    Architecture("OPT", _family("opt")),
    Architecture("BART", _family("bart"), "encoder-decoder"),
    Architecture("mBART", lambda: transformers.MBartConfig(**_SEQ2SEQ), "encoder-decoder, pre-norm"),
    Architecture("Pegasus", lambda: transformers.PegasusConfig(**_SEQ2SEQ), "encoder-decoder, sinusoidal positions"),
    Architecture("T5", _family("t5"), "encoder-decoder, relative position bias"),
]}

README = Path(__file__).resolve().parents[1] / "README.md"
_START, _END = "<!-- proven-architectures:start -->", "<!-- proven-architectures:end -->"


def build(model_type: str, seed: int = 0):
    """The tiny random model of `model_type`, in eval mode."""
    config = ARCHITECTURES[model_type].config()
    auto = transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder else transformers.AutoModelForCausalLM
    torch.manual_seed(seed)
    model = auto.from_config(config)
    model.generation_config.pad_token_id = PAD
    return model.eval()


def readme_list() -> str:
    """The README's list of proven model types, as this table gives it."""
    return "\n".join(f"- `{t}` ({a.name}){': ' + a.features if a.features else ''}" for t, a in ARCHITECTURES.items())


def _block(text: str) -> re.Match:
    found = re.search(re.escape(_START) + r"\n(.*?)" + re.escape(_END), text, flags=re.S)
    if found is None:
        raise ValueError(f"README.md has no block between {_START} and {_END}")
    return found


def readme_block(text: str) -> str:
    """The text between the README's markers (what `readme_list` must equal)."""
    return _block(text).group(1).rstrip("\n")


def write_readme() -> None:
    text = README.read_text()
    found = _block(text)
    README.write_text(text[: found.start()] + f"{_START}\n{readme_list()}\n{_END}" + text[found.end():])


if __name__ == "__main__":
    write_readme()
    print(f"README.md: {len(ARCHITECTURES)} proven model types written", file=sys.stderr)
