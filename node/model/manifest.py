"""A model's identity: digests of its config, each block, and the client's head.

The model digest is computed from the block digests, so any span's digest can be named from the
manifest alone, and a node proves its own blocks match by hashing only the tensors it loaded.
Computing a manifest reads every tensor once (block by block); it is then kept beside the
checkpoint as ``corolla-manifest.json`` so later runs, and nodes that hold only a span, skip it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from corolla.errors import CheckpointError
from corolla.node.model.checkpoint import Checkpoint
from corolla.verify.digests import tensor_digest
from corolla.verify.encoding import domain_digest

__all__ = [
    "MANIFEST_FILE",
    "Manifest",
    "block_digest",
    "compute_manifest",
    "config_digest",
    "head_digest",
    "head_tensor_names",
    "load_manifest",
    "manifest_differences",
    "stored_manifest",
    "verify_manifest",
]

MANIFEST_FILE = "corolla-manifest.json"


@dataclass(frozen=True)
class Manifest:
    family: str
    config_digest: bytes
    block_digests: tuple[bytes, ...]
    head_digest: bytes

    @property
    def num_blocks(self) -> int:
        return len(self.block_digests)

    @property
    def model_digest(self) -> bytes:
        return domain_digest(
            "model", self.config_digest, list(self.block_digests), self.head_digest
        )

    def span_digest(self, start: int, end: int) -> bytes:
        return span_digest(self.config_digest, start, end, self.block_digests[start:end])

    def to_json(self) -> str:
        return json.dumps(
            {
                "family": self.family,
                "config_digest": self.config_digest.hex(),
                "block_digests": [d.hex() for d in self.block_digests],
                "head_digest": self.head_digest.hex(),
                "model_digest": self.model_digest.hex(),
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
            manifest = cls(
                family=str(data["family"]),
                config_digest=bytes.fromhex(data["config_digest"]),
                block_digests=tuple(bytes.fromhex(d) for d in data["block_digests"]),
                head_digest=bytes.fromhex(data["head_digest"]),
            )
            stated = bytes.fromhex(data["model_digest"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"malformed {MANIFEST_FILE}: {error}") from error
        if stated != manifest.model_digest:
            raise CheckpointError(f"{MANIFEST_FILE} is inconsistent: its model digest is wrong")
        return manifest


def span_digest(config: bytes, start: int, end: int, blocks: tuple[bytes, ...]) -> bytes:
    return domain_digest("span", config, start, end, list(blocks))


def config_digest(checkpoint: Checkpoint) -> bytes:
    raw = json.loads((checkpoint.directory / "config.json").read_text())
    return domain_digest("config", json.dumps(raw, sort_keys=True, separators=(",", ":")))


def tensors_digest(domain: str, tensors: dict[str, torch.Tensor], prefix: str = "") -> bytes:
    named = [[name.removeprefix(prefix), tensor_digest(tensors[name])] for name in sorted(tensors)]
    return domain_digest(domain, named)


def block_digest(index: int, tensors: dict[str, torch.Tensor], prefix: str) -> bytes:
    return domain_digest("block", index, tensors_digest("block-tensors", tensors, prefix))


def head_tensor_names(checkpoint: Checkpoint) -> list[str]:
    return sorted(set(checkpoint.head_tensor_map().values()))


def head_digest(tensors: dict[str, torch.Tensor]) -> bytes:
    return tensors_digest("head", tensors)


def compute_manifest(
    checkpoint: Checkpoint, on_block: Callable[[int], None] | None = None
) -> Manifest:
    """Hash every block and the head, reading one block at a time."""
    blocks = []
    for index in range(checkpoint.num_blocks):
        names = checkpoint.block_tensor_names(index)
        if not names:
            raise CheckpointError(
                f"block {index} has no tensors in {checkpoint.source} (read in the "
                f"{checkpoint.layout.name} layout: {checkpoint.family.block_prefix(index)}*)"
            )
        tensors = checkpoint.read(names)
        blocks.append(block_digest(index, tensors, checkpoint.family.block_prefix(index)))
        if on_block is not None:
            on_block(index)
    head = head_digest(checkpoint.read(head_tensor_names(checkpoint)))
    return Manifest(
        family=checkpoint.family.name,
        config_digest=config_digest(checkpoint),
        block_digests=tuple(blocks),
        head_digest=head,
    )


def stored_manifest(checkpoint: Checkpoint) -> Manifest | None:
    """The manifest kept beside the checkpoint, or None. Not checked against the tensors."""
    path = checkpoint.directory / MANIFEST_FILE
    return Manifest.from_json(path.read_text()) if path.is_file() else None


def load_manifest(
    checkpoint: Checkpoint, on_block: Callable[[int], None] | None = None
) -> Manifest:
    """The stored manifest if it matches the config, else a freshly computed (and saved) one.

    A stored manifest is trusted for the blocks this process does not load; every tensor that
    is loaded is checked against it (``load_span``, ``read_head``), and ``verify_manifest``
    checks all of them.
    """
    manifest = stored_manifest(checkpoint)
    if (
        manifest is not None
        and manifest.config_digest == config_digest(checkpoint)
        and manifest.num_blocks == checkpoint.num_blocks
    ):
        return manifest
    manifest = compute_manifest(checkpoint, on_block)
    _write_atomically(checkpoint.directory / MANIFEST_FILE, manifest.to_json())
    return manifest


def verify_manifest(
    checkpoint: Checkpoint, on_block: Callable[[int], None] | None = None
) -> Manifest:
    """Hash every tensor; the result, saved if no manifest was stored.

    Raises CheckpointError naming what differs when a stored manifest does not match the
    tensors (a changed weight, a manifest copied from another model).
    """
    computed = compute_manifest(checkpoint, on_block)
    stored = stored_manifest(checkpoint)
    if stored is None:
        _write_atomically(checkpoint.directory / MANIFEST_FILE, computed.to_json())
        return computed
    differences = manifest_differences(stored, computed)
    if differences:
        raise CheckpointError(
            f"{MANIFEST_FILE} in {checkpoint.directory} does not match the tensors: "
            f"{'; '.join(differences)}. Delete it to recompute it from the weights"
        )
    return computed


def manifest_differences(stored: Manifest, computed: Manifest) -> list[str]:
    """What a stored manifest gets wrong about a computed one, in words."""
    if stored.num_blocks != computed.num_blocks or stored.family != computed.family:
        return [
            f"it describes a {stored.family} model of {stored.num_blocks} blocks, the "
            f"checkpoint is a {computed.family} model of {computed.num_blocks} blocks"
        ]
    differences = []
    if stored.config_digest != computed.config_digest:
        differences.append("its config digest is another config's")
    changed = [
        str(index)
        for index, (a, b) in enumerate(
            zip(stored.block_digests, computed.block_digests, strict=True)
        )
        if a != b
    ]
    if changed:
        differences.append(f"block {', '.join(changed)} differ")
    if stored.head_digest != computed.head_digest:
        differences.append("the head tensors differ")
    return differences


def _write_atomically(path: Path, text: str) -> None:
    try:
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-")
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(temp, path)
    except OSError:
        pass  # a read-only checkpoint still works; the manifest is recomputed next time
