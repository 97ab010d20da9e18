"""Import a PEFT PrefixTuning checkpoint (decoder-only) as a prefixtune prefix.

PEFT saves `prompt_embeddings` of shape (num_virtual_tokens, num_layers * 2 * token_dim): the prefix P
after its projection MLP, laid out per position as [layer 0 key, layer 0 value, layer 1 key, ...], each
(kv heads * head dim) -- the layout of `prefix.flatten`. Positions of real tokens start after the
prefix in PEFT too, so logits carry over exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file

from . import _compat
from .checkpoint import PrefixMismatchError, describe_shapes
from .prefix import PrefixKV, unflatten


def is_peft_checkpoint(directory: str | os.PathLike) -> bool:
    """A PEFT adapter directory (adapter_config.json) that is not also a saved prefixtune prefix."""
    directory = Path(directory)
    return (directory / "adapter_config.json").is_file() and not (directory / "prefix_config.json").is_file()


def load_peft_prefix(directory: str | os.PathLike, base, shapes) -> PrefixKV:
    """Read adapter_config.json + adapter_model.safetensors; check they fit `base` (attention `shapes`)."""
    directory = Path(directory)
    cfg_path, weights = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{directory} is not a PEFT checkpoint: expected adapter_config.json and adapter_model.safetensors "
            "(pickled adapter_model.bin files are not read; re-save with safe_serialization=True)"
        )
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, only PREFIX_TUNING can be imported")
    if _compat.is_encoder_decoder(base):
        raise ValueError("PEFT prefix import supports decoder-only models (PEFT prefixes only the decoder of "
                         "encoder-decoder models, which would leave encoder and cross-attention unprefixed)")
    tensors = load_file(str(weights), device="cpu")
    if "prompt_embeddings" not in tensors:
        raise ValueError(f"{weights} has no 'prompt_embeddings' tensor (found {sorted(tensors)[:5]})")
    flat = tensors["prompt_embeddings"].float()
    role_shapes = [shapes[s] for s in sorted(shapes) if s[0] == "self"]
    width = sum(2 * h * d for h, d in role_shapes)
    if flat.ndim != 2 or flat.shape[1] != width:
        raise PrefixMismatchError(
            f"PEFT prefix in {directory} has shape {tuple(flat.shape)} (num_layers={cfg.get('num_layers')}, "
            f"token_dim={cfg.get('token_dim')}), but this {base.config.model_type} model needs width {width} "
            f"([{describe_shapes(shapes)}])"
        )
    device = next(base.parameters()).device
    return PrefixKV(unflatten(flat.to(device), "self", role_shapes))
