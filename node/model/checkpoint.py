"""A Hugging Face checkpoint directory, read tensor by tensor.

Nothing here loads a whole model: a node reads only its span's tensors and the client only the
head's, through ``safetensors.safe_open`` on single-file or sharded (index.json) checkpoints.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from corolla.errors import CheckpointError, MissingTensor, SpanOutOfRange
from corolla.node.model.families import Family, family_for

__all__ = ["Checkpoint", "parse_span"]

_SINGLE_FILE = "model.safetensors"
_INDEX_FILE = "model.safetensors.index.json"


class Checkpoint:
    """A checkpoint directory: its config, family, and where each tensor lives."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory} is not a directory")
        if not (self.directory / "config.json").is_file():
            raise CheckpointError(f"{self.directory} has no config.json: not a model checkpoint")
        try:
            self.config: PretrainedConfig = AutoConfig.from_pretrained(self.directory)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as error:
            raise CheckpointError(
                f"cannot read {self.directory / 'config.json'}: {error}"
            ) from error
        self.family: Family = family_for(self.config)
        self.config._attn_implementation = self.family.attn_implementation
        self.num_blocks = self.family.num_blocks(self.config)
        self.max_length = self.family.max_length(self.config)
        self._file_of = self._tensor_files()

    def _tensor_files(self) -> dict[str, Path]:
        index = self.directory / _INDEX_FILE
        single = self.directory / _SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise CheckpointError(f"malformed {index}: {error}") from error
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"malformed {index}: weight_map is not an object")
            files = {name: self.directory / str(file) for name, file in weight_map.items()}
        elif single.is_file():
            files = {name: single for name in _keys_of(single)}
        else:
            raise CheckpointError(
                f"{self.directory} has no {_SINGLE_FILE} or {_INDEX_FILE}: no weights to load"
            )
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

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Read exactly the named tensors, opening each file once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._file_of:
                raise MissingTensor(f"tensor {name!r} is not in the checkpoint {self.directory}")
            by_file.setdefault(self._file_of[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for path, file_names in by_file.items():
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for name in file_names:
                        tensors[name] = handle.get_tensor(name)
            except (OSError, ValueError) as error:
                raise CheckpointError(f"cannot read {path}: {error}") from error
        return tensors

    def parameter_count(self, names: Iterable[str] | None = None) -> int:
        """Number of parameters in the named tensors (all by default), read from headers only."""
        count = 0
        by_file: dict[Path, list[str]] = {}
        for name in self.tensor_names if names is None else names:
            by_file.setdefault(self._file_of[name], []).append(name)
        for path, file_names in by_file.items():
            with safe_open(str(path), framework="pt") as handle:
                for name in file_names:
                    shape = handle.get_slice(name).get_shape()
                    count += int(torch.tensor(shape).prod().item()) if shape else 1
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
    except (OSError, ValueError) as error:
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
