"""A GGUF file (llama.cpp's format) into a checkpoint directory Corolla and transformers load.

transformers reads GGUF files and dequantizes them (with the ``gguf`` and ``accelerate``
packages) but will not save the result ("quantized with gguf, not serializable"). So the
conversion takes the dequantized fp32 weights and writes them itself: ``model.safetensors``,
``config.json`` without the quantization entry, the tokenizer with its chat template, the
generation config, ``corolla-manifest.json``, and ``corolla-source.json`` naming the file (and its
sha256) it came from. It writes into a temporary directory beside the target and renames it
into place, so a half-written conversion never looks like a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from corolla.errors import CheckpointError, UnsupportedModel
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.families import family_for
from corolla.node.model.manifest import load_manifest

__all__ = ["GGUF_ARCHITECTURES", "GgufInfo", "ImportProgress", "import_gguf", "inspect_gguf"]

GGUF_MAGIC = b"GGUF"
# GGUF architecture name -> Corolla family (Mistral files say "llama" with a Mistral name and
# become Mistral configs in transformers, which no family handles yet: refused after loading).
GGUF_ARCHITECTURES = {"llama": "llama", "bloom": "bloom"}
SOURCE_FILE = "corolla-source.json"

ImportProgress = Callable[[str, int, int], None]
"""Called as (what is happening, done, total); total 0 when the step has no count."""


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    architecture: str
    name: str
    tensors: int
    blocks: int


def _no_progress(description: str, done: int, total: int) -> None:
    return None


def inspect_gguf(path: str | Path) -> GgufInfo:
    """Read a GGUF file's header and tensor table; CheckpointError if it is not one Corolla
    can import (missing, not GGUF, truncated or corrupt, or an unsupported architecture)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        fields = reader.fields
        architecture = _text_field(fields, "general.architecture")
        name = _text_field(fields, "general.name", required=False) or path.stem
        tensors = list(reader.tensors)
    except (ValueError, IndexError, KeyError, TypeError, OSError, struct.error) as error:
        raise CheckpointError(
            f"{path} is not a readable GGUF file (truncated or corrupt: {error})"
        ) from error
    if architecture not in GGUF_ARCHITECTURES:
        supported = ", ".join(sorted(GGUF_ARCHITECTURES))
        raise UnsupportedModel(
            f"{path} holds a {architecture!r} model; Corolla imports GGUF files of: {supported}"
        )
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    block_field = f"{architecture}.block_count"
    blocks = int(fields[block_field].contents()) if block_field in fields else 0
    return GgufInfo(path, architecture, name, len(tensors), blocks)


def _text_field(fields: dict, key: str, required: bool = True) -> str | None:
    if key not in fields:
        if required:
            raise KeyError(f"no {key} field")
        return None
    value = fields[key].contents()
    if not isinstance(value, str):
        raise TypeError(f"{key} is not text")
    return value


def import_gguf(
    path: str | Path, directory: str | Path, progress: ImportProgress | None = None
) -> Path:
    """Convert a GGUF file into a new checkpoint directory (which must not exist or be empty)."""
    info = inspect_gguf(path)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise CheckpointError(f"{directory} already exists and is not empty: choose a new one")
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{directory.name}.partial-", dir=directory.parent))
    try:
        convert_into(info, partial, progress or _no_progress)
        umask = os.umask(0)
        os.umask(umask)
        partial.chmod(0o777 & ~umask)  # mkdtemp made it private; a checkpoint is not secret
        for written in partial.iterdir():
            written.chmod(0o666 & ~umask)
        if directory.exists():
            directory.rmdir()  # empty (checked above): a rename may not replace a directory
        os.replace(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return directory


def convert_into(info: GgufInfo, target: Path, progress: ImportProgress) -> None:
    """Write the checkpoint converted from `info.path` into the existing directory `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source = str(info.path.resolve())
    progress("reading the tokenizer and chat template", 0, 0)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(info.path.parent), gguf_file=source)
    except (ValueError, KeyError, OSError, TypeError, IndexError) as error:
        raise CheckpointError(f"cannot build a tokenizer from {info.path}: {error}") from error
    dequantizing = f"dequantizing {info.tensors} tensors to fp32"
    progress(dequantizing, 0, info.tensors)
    try:
        with _tensor_progress(lambda done: progress(dequantizing, done, info.tensors)):
            model = AutoModelForCausalLM.from_pretrained(
                str(info.path.parent), gguf_file=source, dtype=torch.float32
            )
    except (ValueError, KeyError, OSError, TypeError, IndexError, RuntimeError) as error:
        raise CheckpointError(f"cannot convert the tensors of {info.path}: {error}") from error
    config = model.config
    family = family_for(config)  # e.g. a Mistral GGUF (architecture "llama") is refused here
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written are plain fp32
    config.dtype = torch.float32

    progress("writing fp32 safetensors", 0, 0)
    from safetensors.torch import save_file

    state = model.state_dict()
    if config.tie_word_embeddings:
        for tied, target_name in family.tied_fallback().items():
            if tied in state and state[tied].data_ptr() == state[target_name].data_ptr():
                del state[tied]  # stored once, as transformers stores tied weights
    save_file(
        {name: tensor.contiguous() for name, tensor in state.items()},
        str(target / "model.safetensors"),
        metadata={"format": "pt"},
    )
    del model, state
    config.save_pretrained(target)
    GenerationConfig.from_model_config(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / SOURCE_FILE).write_text(
        json.dumps(
            {
                "gguf_file": info.path.name,
                "gguf_sha256": file_sha256(info.path),
                "gguf_name": info.name,
                "architecture": info.architecture,
            },
            indent=2,
        )
    )
    checkpoint = Checkpoint(target)
    total = checkpoint.num_blocks

    def on_block(index: int) -> None:
        progress("hashing blocks for the manifest", index + 1, total)

    progress("hashing blocks for the manifest", 0, total)
    load_manifest(checkpoint, on_block)


@contextmanager
def _tensor_progress(on_tensor: Callable[[int], None]) -> Iterator[None]:
    """Report transformers' GGUF tensor loop to `on_tensor` instead of its own tqdm bar (which
    its progress-bar switch does not reach)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    def reporting(items: Iterable[Any], desc: str = "") -> Iterator[Any]:
        for done, item in enumerate(items, 1):
            yield item
            on_tensor(done)

    original = gguf_utils.tqdm
    gguf_utils.tqdm = reporting
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
