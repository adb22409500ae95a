"""Checkpoints named by a Hugging Face hub id (``org/name`` or ``org/name@revision``).

Only what a caller reads is downloaded: the small files (config, index, tokenizer, chat
template, a published ``corolla-manifest.json``) when the checkpoint is opened, then the shard
files that hold the tensors a span or a head reads, chosen from the index. Everything goes
through ``huggingface_hub``'s cache, so it also works offline (``HF_HUB_OFFLINE=1``) on what the
cache already holds, and says which file is missing when it does not.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from corolla.errors import CheckpointError

__all__ = ["METADATA_FILES", "HubSource", "fetch_files", "fetch_metadata", "parse_hub_id"]

# Everything a checkpoint needs besides its weights (missing ones are simply not there).
METADATA_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "corolla-manifest.json",
)

_HUB_ID = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$"
)


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(text: str) -> HubSource | None:
    """``org/name[@revision]`` -> HubSource; anything else (a path) -> None."""
    match = _HUB_ID.match(text)
    if match is None or ".." in text:
        return None
    return HubSource(match["repo"], match["revision"])


def _download(source: HubSource, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(
            source.repo_id, revision=source.revision, allow_patterns=patterns
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(
            f"cannot get {source} from the hub (and no directory has that name): {reason}"
        ) from error
    return Path(folder)


def fetch_metadata(source: HubSource) -> Path:
    """Download (or find in the cache) the checkpoint's small files; return its folder."""
    folder = _download(source, list(METADATA_FILES))
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"{source} has no config.json in the hub cache: not a model checkpoint, or the hub "
            "cannot be reached (HF_HUB_OFFLINE is set or there is no network)"
        )
    return folder


def fetch_files(source: HubSource, folder: Path, files: Iterable[str]) -> None:
    """Download the named files of the checkpoint into its cache folder, only those missing."""
    missing = sorted({name for name in files if not (folder / name).is_file()})
    if not missing:
        return
    _download(source, missing)
    absent = [name for name in missing if not (folder / name).is_file()]
    if absent:
        raise CheckpointError(
            f"{', '.join(absent)} of {source} is not in the hub cache and could not be "
            "downloaded (HF_HUB_OFFLINE is set or the hub cannot be reached)"
        )
