"""A Hugging Face checkpoint, read tensor by tensor.

Nothing here loads a whole model: a node reads only its span's tensors and the client only the
head's, through ``safetensors.safe_open`` on single-file or sharded (index.json) checkpoints.
Tensors are named as the family's ``...ForCausalLM`` class names them, whatever layout the files
use (the layout is detected once, from the index or the file's keys). A hub id (``org/name``)
downloads only the files that hold what is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PretrainedConfig

from corolla.errors import CheckpointError, MissingTensor, SpanOutOfRange
from corolla.node.model.families import Family, KeyLayout, family_for
from corolla.node.model.hub import HubSource, fetch_files, fetch_metadata, parse_hub_id

__all__ = ["Checkpoint", "parse_span"]

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """A checkpoint directory (or hub id): its config, family, layout and where each tensor
    lives."""

    def __init__(self, source: str | Path) -> None:
        self.source = str(source)
        local = Path(source)
        self.hub: HubSource | None = None if local.exists() else parse_hub_id(self.source)
        self.directory = fetch_metadata(self.hub) if self.hub is not None else local
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory")
        if not (self.directory / "config.json").is_file():
            raise CheckpointError(f"{self.directory} has no config.json: not a model checkpoint")
        try:
            self.config: PretrainedConfig = AutoConfig.from_pretrained(self.directory)
        except (ValueError, OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"cannot read {self.directory / 'config.json'}: {error}"
            ) from error
        self.family: Family = family_for(self.config)
        self.config._attn_implementation = self.family.attn_implementation
        self.num_blocks = self.family.num_blocks(self.config)
        self.max_length = self.family.max_length(self.config)
        stored = self._stored_files()
        self.layout: KeyLayout = self.family.detect_layout(stored, str(self.source))
        self._file_of: dict[str, Path] = {}
        self._stored_name: dict[str, str] = {}
        for stored_name, path in stored.items():
            name = self.layout.canonical(stored_name)
            if name in self._file_of:
                raise CheckpointError(
                    f"{self.source}: tensors {self._stored_name[name]!r} and {stored_name!r} "
                    f"are both {name!r} in the {self.layout.name} layout"
                )
            self._file_of[name] = path
            self._stored_name[name] = stored_name

    def _stored_files(self) -> dict[str, Path]:
        """{stored tensor name: file}, from the index or the single file's header."""
        index = self.directory / _INDEX_FILE
        single = self.directory / _SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"malformed {index}: {error}") from error
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"malformed {index}: weight_map is not an object")
            files = {str(name): self.directory / str(file) for name, file in weight_map.items()}
            for path in set(files.values()):
                if path.parent != self.directory:
                    raise CheckpointError(f"malformed {index}: {path.name} is outside the folder")
        else:
            if self.hub is not None:
                fetch_files(self.hub, self.directory, [_SINGLE_FILE])
            if not single.is_file():
                raise CheckpointError(
                    f"{self.directory} has no {_SINGLE_FILE} or {_INDEX_FILE}: no weights to load"
                )
            files = {name: single for name in _keys_of(single)}
        if self.hub is None:
            for path in set(files.values()):
                if not path.is_file():
                    raise CheckpointError(f"weight file {path} named by the index is missing")
        return files

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self._file_of)

    def has(self, name: str) -> bool:
        return name in self._file_of

    def block_tensor_names(self, index: int) -> list[str]:
        prefix = self.family.block_prefix(index)
        return [name for name in self.tensor_names if name.startswith(prefix)]

    def head_tensor_map(self) -> dict[str, str]:
        """{head state key: checkpoint tensor} for the client's tensors.

        A tied checkpoint that stores no LM head reads the embedding in its place; one that
        stores an LM head anyway uses it, as transformers does.
        """
        with torch.device("meta"):  # only the names are wanted: no weights allocated
            _, names = self.family.build_head(self.config)
        tied = self.family.tied_fallback() if self.config.tie_word_embeddings else {}
        return {
            local: tied[name] if not self.has(name) and name in tied else name
            for local, name in names.items()
        }

    def files_of(self, names: Iterable[str]) -> set[Path]:
        """The weight files holding the named tensors."""
        return {self._file(name) for name in names}

    def _file(self, name: str) -> Path:
        if name not in self._file_of:
            raise MissingTensor(f"tensor {name!r} is not in the checkpoint {self.source}")
        return self._file_of[name]

    def _by_file(self, names: Iterable[str]) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self._file(name), []).append(name)
        if self.hub is not None:
            fetch_files(self.hub, self.directory, [path.name for path in by_file])
        return by_file

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly the named tensors, opening each file once."""
        tensors: dict[str, torch.Tensor] = {}
        for path, file_names in self._by_file(names).items():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in file_names:
                        tensors[name] = handle.get_tensor(self._stored_name[name])
            except (OSError, ValueError, SafetensorError) as error:
                raise CheckpointError(f"cannot read {path}: {error}") from error
        return tensors

    def parameter_count(self, names: Iterable[str] | None = None) -> int:
        """Number of parameters in the named tensors (all by default), read from headers only."""
        count = 0
        wanted = self.tensor_names if names is None else names
        for path, file_names in self._by_file(wanted).items():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in file_names:
                        count += math.prod(handle.get_slice(self._stored_name[name]).get_shape())
            except (OSError, ValueError, SafetensorError) as error:
                raise CheckpointError(f"cannot read {path}: {error}") from error
        return count

    def check_span(self, start: int, end: int) -> None:
        if not 0 <= start < end <= self.num_blocks:
            raise SpanOutOfRange(
                f"blocks {start}:{end} are outside the model's {self.num_blocks} blocks "
                f"(a span is start:end with 0 <= start < end <= {self.num_blocks})"
            )


def _keys_of(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    except (OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error


def parse_span(text: str) -> tuple[int, int]:
    """'3:7' -> (3, 7). Range checks against a model happen in Checkpoint.check_span."""
    start_text, sep, end_text = text.partition(":")
    if not sep:
        raise SpanOutOfRange(f"blocks must look like START:END (for example 0:4), got {text!r}")
    try:
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise SpanOutOfRange(f"blocks must be two integers START:END, got {text!r}") from None
    if start < 0 or end <= start:
        raise SpanOutOfRange(f"blocks {text!r}: need 0 <= START < END")
    return start, end
