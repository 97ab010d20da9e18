"""Saving and loading a trained prefix: `prefix.safetensors` + `prefix_config.json`, nothing else.

Only safetensors are ever read (no unpickling). Files are written under temporary names and moved into
place, so an interrupted or refused save never leaves a half-written prefix behind.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from .config import PrefixConfig, TextFormat, from_dict, to_dict
from .inject import Slot
from .prefix import PrefixKV

WEIGHTS_NAME = "prefix.safetensors"
CONFIG_NAME = "prefix_config.json"
FORMAT_VERSION = 1


class PrefixMismatchError(ValueError):
    """A saved prefix does not fit the base model it is loaded onto."""


@dataclass
class LoadedPrefix:
    prefix: PrefixKV
    config: PrefixConfig
    text_format: TextFormat
    meta: dict


def describe_shapes(shapes: dict[Slot, tuple[int, int]]) -> str:
    """'self: 30 layers x 3 kv heads x 64 dims' (per role; lists layers when they differ)."""
    parts = []
    for role in dict.fromkeys(r for r, _ in shapes):
        layer_shapes = [shapes[s] for s in sorted(s for s in shapes if s[0] == role)]
        if len(set(layer_shapes)) == 1:
            h, d = layer_shapes[0]
            parts.append(f"{role}: {len(layer_shapes)} layers x {h} kv heads x {d} dims")
        else:
            parts.append(f"{role}: {len(layer_shapes)} layers with (kv heads, dims) {layer_shapes}")
    return "; ".join(parts)


def _shapes_to_json(shapes: dict[Slot, tuple[int, int]]) -> dict:
    out: dict[str, list] = {}
    for (role, layer), hd in sorted(shapes.items()):
        out.setdefault(role, []).append(list(hd))
    return out


def _shapes_from_json(data: dict) -> dict[Slot, tuple[int, int]]:
    return {(role, i): (int(h), int(d)) for role, layers in data.items() for i, (h, d) in enumerate(layers)}


def save(directory: str | os.PathLike, prefix: PrefixKV, base, config: PrefixConfig,
         text_format: TextFormat, extra: dict | None = None) -> Path:
    """Write the final prefix (fp32) and its config into `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for (role, layer), (k, v) in prefix.kv.items():
        tensors[f"{role}.{layer}.key"] = k.detach().float().contiguous().cpu()
        tensors[f"{role}.{layer}.value"] = v.detach().float().contiguous().cpu()
    meta = {
        "format_version": FORMAT_VERSION,
        "base_model": {
            "name_or_path": str(getattr(base.config, "_name_or_path", "")),
            "model_type": base.config.model_type,
            "layer_shapes": _shapes_to_json(prefix.shapes()),
        },
        "prefix_length": prefix.length,
        "num_parameters": prefix.num_parameters(),
        "prefix_config": to_dict(config),
        "text_format": to_dict(text_format),
        **(extra or {}),
    }
    tmp_weights = directory / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    tmp_config = directory / f".{CONFIG_NAME}.tmp{os.getpid()}"
    try:
        save_file(tensors, str(tmp_weights), metadata={"format": "pt", "producer": "prefixtune"})
        tmp_config.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp_weights, directory / WEIGHTS_NAME)
        os.replace(tmp_config, directory / CONFIG_NAME)
    finally:
        for tmp in (tmp_weights, tmp_config):
            tmp.unlink(missing_ok=True)
    return directory


def read_meta(directory: str | os.PathLike) -> dict:
    """The JSON config of a saved prefix, with a clear error when the directory is not one."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not cfg_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a saved prefix: expected {CONFIG_NAME} and {WEIGHTS_NAME} there "
            "(write one with PrefixTuningModel.save_pretrained or `prefixtune train --output DIR`)"
        )
    try:
        meta = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: unsupported format_version {meta.get('format_version')!r} (expected {FORMAT_VERSION})")
    return meta


def load(directory: str | os.PathLike, shapes: dict[Slot, tuple[int, int]], model_type: str,
         device=None) -> LoadedPrefix:
    """Load a prefix for a base model with attention `shapes`; refuse one made for another shape."""
    directory = Path(directory)
    meta = read_meta(directory)
    saved_shapes = _shapes_from_json(meta["base_model"]["layer_shapes"])
    if saved_shapes != shapes:
        raise PrefixMismatchError(
            f"prefix in {directory} was made for {meta['base_model']['model_type']} "
            f"({meta['base_model'].get('name_or_path') or 'unnamed'}) with [{describe_shapes(saved_shapes)}], "
            f"but this {model_type} model has [{describe_shapes(shapes)}]. Load it onto the model it was trained for."
        )
    tensors = load_file(str(directory / WEIGHTS_NAME), device="cpu")
    kv = {}
    for (role, layer) in saved_shapes:
        try:
            k, v = tensors[f"{role}.{layer}.key"], tensors[f"{role}.{layer}.value"]
        except KeyError as err:
            raise ValueError(f"{directory / WEIGHTS_NAME} lacks tensor {err.args[0]}; the file is damaged") from None
        if k.shape != v.shape or k.shape[1] != meta["prefix_length"]:
            raise ValueError(f"{directory / WEIGHTS_NAME}: tensor {role}.{layer} has shape {tuple(k.shape)}, "
                             f"expected ({saved_shapes[(role, layer)][0]}, {meta['prefix_length']}, ...)")
        kv[(role, layer)] = (k.to(device), v.to(device))
    config = from_dict(PrefixConfig, meta["prefix_config"])
    config.prefix_length = int(meta["prefix_length"])
    return LoadedPrefix(PrefixKV(kv, infix=config.variant == "infix"), config, from_dict(TextFormat, meta["text_format"]), meta)


def load_for(directory: str | os.PathLike, base, shapes) -> LoadedPrefix:
    """`load` for a base model: reads its model type and device."""
    return load(directory, shapes, base.config.model_type, device=next(base.parameters()).device)


__all__ = ["save", "load", "load_for", "read_meta", "LoadedPrefix", "PrefixMismatchError", "describe_shapes",
           "WEIGHTS_NAME", "CONFIG_NAME"]
