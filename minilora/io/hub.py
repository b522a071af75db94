"""Resolving a model reference to a local checkpoint directory: a path, or a Hugging Face Hub id.

``resolve_model_dir("./my-model")`` returns the directory itself. ``resolve_model_dir("HuggingFaceTB/
SmolLM2-135M")`` goes through ``huggingface_hub.snapshot_download``, which reuses the local cache
(``HF_HOME`` / ``HF_HUB_CACHE``) and downloads only what is missing. With ``HF_HUB_OFFLINE=1`` (read at
call time) or ``local_files_only=True`` nothing is downloaded: the cached snapshot is used or a
FileNotFoundError says the model is not in the cache.

Only the files a loader needs are fetched: config and tokenizer JSON, safetensors weights and their
index; pickle weights (``*.bin``) only when ``allow_pickle`` is set.
"""

from __future__ import annotations

import os
from pathlib import Path

SAFE_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
PICKLE_PATTERNS = ["pytorch_model*.bin"]


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set to a true value (checked now, not at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(ref: str) -> bool:
    """A reference that can only be a filesystem path (a hub id is "name" or "owner/name")."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or os.sep != "/" and os.sep in ref


def resolve_model_dir(
    path_or_id: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    allow_pickle: bool = False,
    token: str | bool | None = None,
) -> Path:
    """The local directory holding the checkpoint ``path_or_id`` names (downloading it if needed)."""
    path = Path(os.fspath(path_or_id)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; expected a checkpoint directory or a hub model id")
    ref = os.fspath(path_or_id)
    if _looks_like_path(ref):
        raise FileNotFoundError(f"checkpoint directory {ref} does not exist")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    offline = local_files_only or hub_offline()
    patterns = SAFE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        local = snapshot_download(
            ref,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=offline,
            allow_patterns=patterns,
            token=token,
        )
    except LocalEntryNotFoundError as e:
        where = "offline mode (HF_HUB_OFFLINE)" if hub_offline() else "local_files_only=True"
        if not offline:
            where = "the hub could not be reached"
        raise FileNotFoundError(
            f"no local directory {ref!r}, and hub model {ref!r} (revision {revision or 'main'}) is not in "
            f"the local Hugging Face cache and {where}: {e}"
        ) from e
    except HFValidationError as e:
        raise FileNotFoundError(f"{ref!r} is neither an existing directory nor a valid hub model id: {e}") from e
    return Path(local)


def resolve_model(ref: str | os.PathLike | None) -> Path:
    """A model reference (None = the default GGUF, a .gguf file, a directory or a hub id) -> a directory."""
    from minilora.io.gguf import default_model_path, gguf_to_dir_cached

    if ref is None:
        return gguf_to_dir_cached(default_model_path())
    if os.fspath(ref).endswith(".gguf"):
        return gguf_to_dir_cached(ref)
    return resolve_model_dir(ref)
