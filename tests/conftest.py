"""Tiny randomly initialised models of every supported family, and a byte-level tokenizer for them.

Everything is built from configs in memory: no download, a few milliseconds per model.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

VOCAB = 300
PAD, EOS, BOS = 256, 257, 258

DECODER_ONLY = ["gpt2", "llama", "opt", "qwen2", "gpt_neox", "gemma", "phi3"]
ENCODER_DECODER = ["bart", "t5"]
ALL_FAMILIES = DECODER_ONLY + ENCODER_DECODER

_SPECIAL = dict(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)


def tiny_config(family: str):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, **_SPECIAL)
    if family == "llama":  # grouped-query attention, like SmolLM2
        return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                                        **_SPECIAL)
    if family == "opt":
        return transformers.OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                      num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=256,
                                      **_SPECIAL)
    if family == "qwen2":
        return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        **_SPECIAL)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, rotary_pct=0.5, max_position_embeddings=256,
                                          **_SPECIAL)
    if family == "gemma":  # multi-query attention, head_dim independent of hidden_size
        return transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                        max_position_embeddings=256, **_SPECIAL)
    if family == "phi3":  # fused qkv projection, partial rotary
        return transformers.Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                                       max_position_embeddings=256, original_max_position_embeddings=256,
                                       **_SPECIAL)
    if family == "bart":
        return transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                       encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                       decoder_ffn_dim=64, max_position_embeddings=256, decoder_start_token_id=EOS,
                                       forced_eos_token_id=None, **_SPECIAL)
    if family == "t5":
        return transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     decoder_start_token_id=PAD, **_SPECIAL)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, attn: str = "sdpa"):
    torch.manual_seed(seed)
    config = tiny_config(family)
    model = transformers.AutoModelForSeq2SeqLM.from_config(config, attn_implementation=attn) if family in ENCODER_DECODER \
        else transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    model.generation_config.pad_token_id = PAD
    return model.eval()


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per byte, plus <pad>, <eos>, <bos> (ids 256-258)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<pad>": PAD, "<eos>": EOS, "<bos>": BOS})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


def save_tiny(path, family: str = "llama", seed: int = 0) -> str:
    """A tiny model + byte tokenizer saved as a local model directory (what --model takes)."""
    model = tiny_model(family, seed)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def resume_step(run_dir) -> int:
    """The step of a run directory's resume state (0 while none is written, or while it is being replaced):
    what a test polls before killing a training run mid-way."""
    import json

    from safetensors import safe_open

    from prefixtune.resume import STATE_NAME

    try:
        with safe_open(str(run_dir / STATE_NAME), framework="pt") as f:
            return json.loads(f.metadata()["counters"])["step"]
    except Exception:  # not written yet, or being replaced
        return 0


@pytest.fixture
def tiny_dir(tmp_path):
    return save_tiny(tmp_path / "tiny-llama")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the hand-offs cost ~3x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
