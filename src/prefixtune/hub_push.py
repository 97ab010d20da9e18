"""Uploading a saved prefix directory to the Hugging Face Hub (`prefixtune push`, `PrefixTuningModel.push_to_hub`).

Only the prefix's own files go up: prefix.safetensors, prefix_config.json and README.md (its model card), never
a run's logs, plot, resume state or tracker files. The directory is checked first (a saved prefix, its weights
matching the checksum in its config, a card written for these weights), so a damaged or half-saved prefix is
never published. Every failure is one line (PushError, a ValueError): the CLI prints it and exits with 2.
"""

from __future__ import annotations

import os
from pathlib import Path

from . import artifact, checkpoint, modelcard

FILES = (checkpoint.WEIGHTS_NAME, checkpoint.CONFIG_NAME, modelcard.CARD_NAME)


class PushError(ValueError):
    """The directory cannot be published, or the Hub refused it or could not be reached."""


def check_folder(directory: str | os.PathLike) -> list[str]:
    """The files of `directory` to upload; PushError when it is not a complete, consistent saved prefix."""
    directory = Path(directory)
    try:
        meta = checkpoint.read_meta(directory)
    except (FileNotFoundError, artifact.DamagedFileError) as err:
        raise PushError(f"cannot push {directory}: {err}") from None
    weights = directory / checkpoint.WEIGHTS_NAME
    expected = meta.get("weights_sha256")
    if not weights.is_file() or (expected and artifact.sha256_file(weights) != expected):
        raise PushError(f"cannot push {directory}: {weights.name} is missing or does not match the checksum in "
                        f"{checkpoint.CONFIG_NAME} (an interrupted save); load and save the prefix again")
    card = directory / modelcard.CARD_NAME
    if card.is_file():
        described = modelcard.described_weights(card.read_text(encoding="utf-8", errors="replace"))
        if described is not None and expected and described != expected:
            raise PushError(f"cannot push {directory}: {card.name} describes another save of this prefix (a save "
                            "was interrupted between the prefix and its card); save the prefix again")
    return [name for name in FILES if (directory / name).is_file()]


def _token(token: str | None) -> str:
    from huggingface_hub import get_token

    token = token or get_token()  # HF_TOKEN, or the one `hf auth login` stored
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass one "
                        "(`prefixtune push --token-env VAR`, push_to_hub(token=...))")
    return token


def _explain(err: Exception, repo_id: str, endpoint: str) -> PushError:
    """One line for what the Hub (or the network) answered."""
    from huggingface_hub.errors import HfHubHTTPError, HTTPError

    if isinstance(err, HfHubHTTPError) and err.response is not None:
        status = err.response.status_code
        detail = " ".join(str(err).split())[:300]
        if status in (401, 403):
            return PushError(f"the Hub refused to write to {repo_id!r} (HTTP {status}): the token lacks write access "
                             f"to that namespace; use a write token ({detail})")
        return PushError(f"the Hub at {endpoint} answered HTTP {status} for {repo_id!r}: {detail}")
    detail = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, (HTTPError, OSError)):  # no answer: refused, reset, timed out
        return PushError(f"the Hub could not be reached at {endpoint} ({detail}); check the network, or HF_ENDPOINT")
    return PushError(f"pushing to {repo_id!r} failed: {detail}")


def push_folder(directory: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Upload the saved prefix in `directory` to the model repository `repo_id` (created if missing, `private`
    then; an existing repository keeps its visibility), on branch `revision` (created from main if missing);
    returns the commit's URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HTTPError  # the HTTP client's (httpx's or its successor's): Hub errors too

    files = check_folder(directory)
    api = HfApi(token=_token(token))
    message = commit_message or f"Upload prefix ({', '.join(files)}) with prefixtune"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(directory), allow_patterns=files,
                                 revision=revision, commit_message=message)
    except (HTTPError, OSError) as err:
        raise _explain(err, repo_id, api.endpoint) from None
    return str(getattr(info, "commit_url", info))


__all__ = ["push_folder", "check_folder", "PushError", "FILES"]
