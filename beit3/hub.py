"""Where a pretrained model lives: a local folder or a Hugging Face Hub repository resolved through the hub cache.

``huggingface_hub`` does the downloading and caching (``HF_HOME`` / ``HF_HUB_CACHE``); with ``HF_HUB_OFFLINE=1`` it
answers from the cache alone, which is how the tests use it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Union

from .errors import CheckpointError

PathLike = Union[str, os.PathLike]

# the files a beit3 model folder holds (beit3.models.checkpoint.save_pretrained)
PRETRAINED_FILES = ["config.json", "model.safetensors", "README.md", "beit3.spm"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(name: str) -> bool:
    """``org/name`` shaped (and not an existing local path)."""
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def resolve_pretrained(name_or_path: PathLike, revision: str | None = None) -> Path:
    """A local folder (``~`` expanded) as is; a hub repository id as its snapshot folder in the hub cache
    (downloaded if needed and allowed)."""
    path = Path(name_or_path).expanduser()
    if path.exists() or not is_repo_id(str(name_or_path)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=PRETRAINED_FILES,
                                      library_name="beit3"))
    except LocalEntryNotFoundError as err:
        raise CheckpointError(
            f"'{name_or_path}' is neither a local folder nor in the Hugging Face cache, and the hub cannot be "
            f"reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): {err}") from err
    except (RepositoryNotFoundError, HfHubHTTPError) as err:
        raise CheckpointError(f"cannot fetch '{name_or_path}' from the Hugging Face Hub: {err}") from err
