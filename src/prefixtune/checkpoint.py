"""Saving and loading a trained prefix: `prefix.safetensors` + `prefix_config.json`, nothing else.

Only safetensors are ever read (no unpickling), and nothing non-finite is saved or loaded.

The pair is one unit. Both files are written into a fresh staging directory next to them; the config,
which holds the SHA-256 of its weights, is moved into place first (the commit), then the weights. Two
renames cannot be one atomic step, so a reader checks the weights against the config's checksum: a save
killed between the renames leaves the new config, the old weights and the new weights still staged, and
the reader takes the staged ones. A reader thus always gets the old pair or the new one, never a mix, and
no file is ever rewritten in place. (Swapping whole directories instead would need the prefix in a
directory of its own, away from the run's logs and resume state, and would change the layout users and
the server rely on.) A finished save removes what interrupted ones left behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from . import artifact
from .config import PrefixConfig, TextFormat, from_dict, to_dict
from .inject import Slot
from .prefix import PrefixKV

WEIGHTS_NAME = "prefix.safetensors"
CONFIG_NAME = "prefix_config.json"
FORMAT_VERSION = 1


#: keys every prefix_config.json has, with the type of their values (weights_sha256: since checksums)
REQUIRED_KEYS = {"format_version": int, "base_model": dict, "prefix_length": int, "prefix_config": dict,
                 "text_format": dict}
REQUIRED_BASE_KEYS = {"model_type": str, "layer_shapes": dict}


class PrefixMismatchError(ValueError):
    """A saved prefix does not fit the base model it is loaded onto."""


class DamagedPrefixError(artifact.DamagedFileError):
    """A saved prefix cannot be used: unreadable or mismatched files, missing keys, invalid values."""


class NonFinitePrefixError(DamagedPrefixError, artifact.NonFiniteError):
    """A saved prefix holds NaN or infinite values (what a diverged run would leave): refused at load."""


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
    """Write the final prefix (fp32) and its config into `directory` (created if missing) as one unit.

    Refuses (NonFiniteError, nothing written) a prefix holding NaN or inf."""
    directory = Path(directory)
    tensors = {}
    for (role, layer), (k, v) in prefix.kv.items():
        tensors[f"{role}.{layer}.key"] = k.detach().float().contiguous().cpu()
        tensors[f"{role}.{layer}.value"] = v.detach().float().contiguous().cpu()
    artifact.require_finite(tensors, f"refusing to save the prefix into {directory}")
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
    directory.mkdir(parents=True, exist_ok=True)
    stage = artifact.new_stage(directory)
    committed = False
    try:
        save_file(tensors, str(stage / WEIGHTS_NAME), metadata={"format": "pt", "producer": "prefixtune"})
        artifact.fsync(stage / WEIGHTS_NAME)
        meta["weights_sha256"] = artifact.sha256_file(stage / WEIGHTS_NAME)
        (stage / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        artifact.fsync(stage / CONFIG_NAME)
        os.replace(stage / CONFIG_NAME, directory / CONFIG_NAME)  # the commit: readers now want the new pair
        committed = True
        os.replace(stage / WEIGHTS_NAME, directory / WEIGHTS_NAME)
        stage.rmdir()
    finally:
        if not committed:  # after the commit the staged weights are the pair's: readers take them from there
            shutil.rmtree(stage, ignore_errors=True)
    artifact.remove_stale(directory, (WEIGHTS_NAME, CONFIG_NAME), stages=True)
    return directory


def _not_a_prefix(directory: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"{directory} is not a saved prefix: expected {CONFIG_NAME} and {WEIGHTS_NAME} there "
        "(write one with PrefixTuningModel.save_pretrained or `prefixtune train --output DIR`)"
    )


def _check_keys(data: dict, required: dict, cfg_path: Path, where: str = "") -> None:
    for key, kind in required.items():
        if key not in data:
            raise DamagedPrefixError(f"{cfg_path} lacks the key '{where}{key}' (a saved prefix config has "
                                     f"{', '.join(where + k for k in required)}); save the prefix again")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise DamagedPrefixError(f"{cfg_path}: '{where}{key}' must be a JSON {kind.__name__}, "
                                     f"got {data[key]!r}; save the prefix again")


def read_meta(directory: str | os.PathLike) -> dict:
    """The JSON config of a saved prefix, its keys checked, with a clear error when the directory is not one."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file() or not ((directory / WEIGHTS_NAME).is_file() or artifact.staged_copies(directory, WEIGHTS_NAME)):
        raise _not_a_prefix(directory)
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DamagedPrefixError(f"{cfg_path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise DamagedPrefixError(f"{cfg_path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DamagedPrefixError(f"{cfg_path}: unsupported format_version {meta.get('format_version')!r} "
                                 f"(expected {FORMAT_VERSION})")
    _check_keys(meta, REQUIRED_KEYS, cfg_path)
    _check_keys(meta["base_model"], REQUIRED_BASE_KEYS, cfg_path, "base_model.")
    return meta


def _weights_path(directory: Path, meta: dict) -> Path:
    """The weights file that belongs to this config: the one in place, or the one an interrupted save had
    staged after committing its config. Configs saved before checksums existed take the one in place."""
    in_place = directory / WEIGHTS_NAME
    expected = meta.get("weights_sha256")
    if expected is None:
        return in_place
    for candidate in [in_place, *artifact.staged_copies(directory, WEIGHTS_NAME)]:
        if candidate.is_file() and artifact.sha256_file(candidate) == expected:
            return candidate
    if not in_place.is_file():
        raise _not_a_prefix(directory)
    raise DamagedPrefixError(
        f"{in_place} does not match the checksum (weights_sha256) in {directory / CONFIG_NAME}: the file is "
        "truncated or corrupted, or was replaced without its config; save or copy the prefix again")


def _parse_configs(meta: dict, cfg_path: Path) -> tuple[PrefixConfig, TextFormat]:
    """PrefixConfig and TextFormat of a config file, validated: a bad value is named with the file."""
    try:
        config = from_dict(PrefixConfig, meta["prefix_config"])
        config.prefix_length = meta["prefix_length"]
        config.validate()
        text_format = from_dict(TextFormat, meta["text_format"]).validate()
    except (TypeError, ValueError) as err:
        raise DamagedPrefixError(f"{cfg_path}: {err}") from None
    return config, text_format


def load(directory: str | os.PathLike, shapes: dict[Slot, tuple[int, int]], model_type: str,
         device=None) -> LoadedPrefix:
    """Load a prefix for a base model with attention `shapes`; refuse one made for another shape, and a
    damaged one (DamagedPrefixError, naming the file)."""
    directory = Path(directory)
    meta = read_meta(directory)
    cfg_path = directory / CONFIG_NAME
    try:
        saved_shapes = _shapes_from_json(meta["base_model"]["layer_shapes"])
    except (TypeError, ValueError) as err:
        raise DamagedPrefixError(f"{cfg_path}: base_model.layer_shapes is malformed ({err})") from None
    if saved_shapes != shapes:
        raise PrefixMismatchError(
            f"prefix in {directory} was made for {meta['base_model']['model_type']} "
            f"({meta['base_model'].get('name_or_path') or 'unnamed'}) with [{describe_shapes(saved_shapes)}], "
            f"but this {model_type} model has [{describe_shapes(shapes)}]. Load it onto the model it was trained for."
        )
    config, text_format = _parse_configs(meta, cfg_path)
    weights = _weights_path(directory, meta)
    try:
        tensors, _ = artifact.read_safetensors(weights)
    except artifact.DamagedFileError as err:
        raise DamagedPrefixError(str(err)) from None
    kv = {}
    for (role, layer), (heads, dims) in saved_shapes.items():
        try:
            k, v = tensors[f"{role}.{layer}.key"], tensors[f"{role}.{layer}.value"]
        except KeyError as err:
            raise DamagedPrefixError(f"{weights} lacks tensor {err.args[0]}; the file is damaged") from None
        for name, t in (("key", k), ("value", v)):
            if tuple(t.shape) != (heads, config.prefix_length, dims) or not t.is_floating_point():
                raise DamagedPrefixError(f"{weights}: tensor {role}.{layer}.{name} is {t.dtype} of shape "
                                         f"{tuple(t.shape)}, expected floats of shape {(heads, config.prefix_length, dims)}")
        kv[(role, layer)] = (k, v)
    try:
        artifact.require_finite(tensors, f"{weights} is refused")
    except artifact.NonFiniteError as err:
        raise NonFinitePrefixError(f"{err}; a diverged training run writes such values (retrain with a lower --lr)") from None
    kv = {slot: (k.to(device), v.to(device)) for slot, (k, v) in kv.items()}
    return LoadedPrefix(PrefixKV(kv, infix=config.variant == "infix"), config, text_format, meta)


def load_for(directory: str | os.PathLike, base, shapes) -> LoadedPrefix:
    """`load` for a base model: reads its model type and device."""
    return load(directory, shapes, base.config.model_type, device=next(base.parameters()).device)


__all__ = ["save", "load", "load_for", "read_meta", "LoadedPrefix", "PrefixMismatchError", "DamagedPrefixError",
           "NonFinitePrefixError", "describe_shapes",
           "WEIGHTS_NAME", "CONFIG_NAME"]
