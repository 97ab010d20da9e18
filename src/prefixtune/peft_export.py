"""Export a saved prefix as a PEFT PrefixTuning checkpoint (`prefixtune export --to peft --prefix DIR OUT`).

The inverse of `peft_import`: the materialised prefix, flattened to PEFT's `prompt_embeddings` layout
(`prefix.flatten`: per position, layer 0 key, layer 0 value, layer 1 key, ...), saved as an embedding
table (prefix_projection false, inference mode), so `peft.PeftModel.from_pretrained(base, OUT)` runs
exactly the prefix prefixtune runs. PEFT is not needed to write it: the two files are plain JSON and
safetensors.

Only decoder-only prefixes map onto PEFT. PEFT's seq2seq prefix tuning puts one prefix into both the
decoder's self-attention and its cross-attention and none into the encoder; prefixtune trains three
separate ones, so an encoder-decoder prefix is refused rather than exported into something else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from . import artifact, checkpoint
from .peft_import import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME
from .prefix import flatten

FORMATS = ("peft",)
"""What `export --to` writes."""


def export(prefix_dir: str | os.PathLike, out: str | os.PathLike, to: str = "peft") -> Path:
    """Write the saved prefix in `prefix_dir` as a `to` checkpoint into the new (or empty) directory `out`.

    ValueError / FileNotFoundError (one line, naming the value) for another format, an `out` that exists and is
    not empty, a `prefix_dir` that is not a saved prefix, or a prefix PEFT cannot represent. Nothing is left
    half-written: the files are written into a temporary directory next to `out`, then renamed to `out`."""
    if to not in FORMATS:
        raise ValueError(f"--to {to!r} is not a known export format; supported: {', '.join(FORMATS)}")
    return export_peft(prefix_dir, out)


def export_peft(prefix_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A PEFT PrefixTuning checkpoint (adapter_config.json + adapter_model.safetensors) of a saved prefix."""
    prefix_dir, out = Path(prefix_dir), Path(out)
    _check_out(out)  # before reading the prefix: the cheap refusal first
    loaded = _load(prefix_dir)
    config, tensors = peft_files(loaded, prefix_dir)
    return _write(out, config, tensors)


def _check_out(out: Path) -> None:
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: export into a new or empty directory")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory: export into a new or empty directory")


def _load(prefix_dir: Path) -> checkpoint.LoadedPrefix:
    """The saved prefix, checked as any load checks it (checksum, shapes, finite values), onto its own shapes:
    no base model is needed to export."""
    meta = checkpoint.read_meta(prefix_dir)
    try:
        shapes = checkpoint._shapes_from_json(meta["base_model"]["layer_shapes"])
    except (TypeError, ValueError) as err:
        raise checkpoint.DamagedPrefixError(f"{prefix_dir / checkpoint.CONFIG_NAME}: base_model.layer_shapes is "
                                            f"malformed ({err})") from None
    return checkpoint.load(prefix_dir, shapes, meta["base_model"]["model_type"])


def peft_files(loaded: checkpoint.LoadedPrefix, prefix_dir: Path) -> tuple[dict, dict]:
    """(adapter_config.json contents, adapter_model.safetensors tensors) of a loaded prefix; ValueError naming
    the model type for a prefix PEFT has no layout for."""
    model_type = loaded.meta["base_model"]["model_type"]
    roles = {role for role, _ in loaded.prefix.kv}
    if roles != {"self"}:
        raise ValueError(f"{prefix_dir} is a prefix for the encoder-decoder model type {model_type!r} "
                         f"({', '.join(sorted(roles))} prefixes): PEFT's seq2seq prefix tuning has one prefix shared by "
                         "decoder self- and cross-attention and none in the encoder, so it cannot be exported; only "
                         "decoder-only prefixes can")
    if loaded.prefix.infix:
        raise ValueError(f"{prefix_dir} is an infix prefix (variant 'infix'); PEFT has no infix variant, so it cannot "
                         "be exported")
    layer_shapes = set(loaded.prefix.shapes().values())
    if len(layer_shapes) != 1:
        raise ValueError(f"{prefix_dir}: its {model_type} layers differ in (kv heads, head dim) "
                         f"{sorted(layer_shapes)}; PEFT's prefix tuning needs one shape for every layer, so it cannot "
                         "be exported")
    (heads, dims), layers = layer_shapes.pop(), len(loaded.prefix.kv)
    name = loaded.meta["base_model"].get("name_or_path") or None
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": name, "revision": None,
        "inference_mode": True, "num_virtual_tokens": loaded.prefix.length, "num_layers": layers,
        # PEFT's grouped-query attention convention (its #1901): heads and token_dim count key/value heads
        "num_attention_heads": heads, "token_dim": heads * dims, "encoder_hidden_size": heads * dims,
        "num_transformer_submodules": 1, "prefix_projection": False, "auto_mapping": None, "modules_to_save": None,
    }
    flat = flatten(loaded.prefix.kv, "self").detach().float().contiguous().cpu()
    return config, {"prompt_embeddings": flat}


def _write(out: Path, config: dict, tensors: dict) -> Path:
    """Both files into a temporary directory beside `out`, flushed, then one rename: `out` appears whole or not
    at all (rename replaces an empty directory; one filled meanwhile makes it fail, and nothing is lost)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = artifact.temporary_file(out)
    shutil.rmtree(stage, ignore_errors=True)  # this process's own leftover from an earlier failed export
    stage.mkdir()
    try:
        save_file(tensors, str(stage / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        (stage / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for name in (PEFT_WEIGHTS_NAME, PEFT_CONFIG_NAME):
            artifact.fsync(stage / name)
        try:
            os.replace(stage, out)
        except OSError as err:
            raise ValueError(f"{out} cannot be written ({err.strerror}): it was filled while exporting, or is not "
                             "writable; export into a new or empty directory") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    artifact.remove_stale(out.parent, (out.name,))  # temporaries of exports that were killed
    return out


__all__ = ["export", "export_peft", "peft_files", "FORMATS"]
