"""Import a PEFT PrefixTuning checkpoint (decoder-only) as a prefixtune prefix.

PEFT saves `prompt_embeddings` of shape (num_virtual_tokens, num_layers * 2 * token_dim): the prefix P
after its projection MLP, laid out per position as [layer 0 key, layer 0 value, layer 1 key, ...], each
(kv heads * head dim) -- the layout of `prefix.flatten`. Positions of real tokens start after the
prefix in PEFT too, so logits carry over exactly. The way back is `peft_export`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import _compat, artifact
from .checkpoint import CONFIG_NAME, DamagedPrefixError, NonFinitePrefixError, PrefixMismatchError, describe_shapes
from .prefix import PrefixKV, unflatten

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"


def is_peft_checkpoint(directory: str | os.PathLike) -> bool:
    """A PEFT adapter directory (adapter_config.json) that is not also a saved prefixtune prefix."""
    directory = Path(directory)
    return (directory / PEFT_CONFIG_NAME).is_file() and not (directory / CONFIG_NAME).is_file()


def read_peft_config(cfg_path: Path) -> dict:
    """adapter_config.json as a dict; DamagedPrefixError naming the file when it is not a JSON object."""
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedPrefixError(f"{cfg_path} is not valid JSON: {err}; save or copy the PEFT checkpoint "
                                 "again") from None
    if not isinstance(cfg, dict):
        raise DamagedPrefixError(f"{cfg_path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def load_peft_prefix(directory: str | os.PathLike, base, shapes) -> PrefixKV:
    """Read adapter_config.json + adapter_model.safetensors; check they fit `base` (attention `shapes`)."""
    directory = Path(directory)
    cfg_path, weights = directory / PEFT_CONFIG_NAME, directory / PEFT_WEIGHTS_NAME
    if not cfg_path.is_file() or not weights.is_file():
        raise FileNotFoundError(
            f"{directory} is not a PEFT checkpoint: expected {PEFT_CONFIG_NAME} and {PEFT_WEIGHTS_NAME} "
            "(pickled adapter_model.bin files are not read; re-save with safe_serialization=True)"
        )
    cfg = read_peft_config(cfg_path)
    if cfg.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, only PREFIX_TUNING can be imported")
    if _compat.is_encoder_decoder(base):
        raise ValueError("PEFT prefix import supports decoder-only models (PEFT prefixes only the decoder of "
                         "encoder-decoder models, which would leave encoder and cross-attention unprefixed)")
    try:
        tensors, _ = artifact.read_safetensors(weights)
    except artifact.DamagedFileError as err:
        raise DamagedPrefixError(str(err)) from None
    if "prompt_embeddings" not in tensors:
        raise DamagedPrefixError(f"{weights} has no 'prompt_embeddings' tensor (found {sorted(tensors)[:5]})")
    try:  # a diverged PEFT run saves NaN as readily as ours would: refused the same way
        artifact.require_finite(tensors, f"{weights} is refused")
    except artifact.NonFiniteError as err:
        raise NonFinitePrefixError(str(err)) from None
    # a copy, not the file's memory map: PEFT's save_pretrained rewrites files in place, and a mapped tensor would
    # change under a task already loaded (or fault, once the file is truncated)
    flat = tensors["prompt_embeddings"].to(torch.float32, copy=True)
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
