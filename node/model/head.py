"""The client's tensors of a checkpoint (embeddings, final norm, LM head), checked and loaded.

Only these tensors are read, and they are checked against the manifest's head digest, so a
client never computes with a head that is not the model it names.
"""

from __future__ import annotations

import torch

from corolla.errors import CheckpointError
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.families import Head
from corolla.node.model.manifest import Manifest, head_digest

__all__ = ["read_head"]


def read_head(checkpoint: Checkpoint, manifest: Manifest) -> Head:
    """The family's Head with the checkpoint's client tensors, after checking them."""
    wanted = checkpoint.head_tensor_map()
    tensors = checkpoint.read(set(wanted.values()))
    if head_digest(tensors) != manifest.head_digest:
        raise CheckpointError(
            f"the head tensors of {checkpoint.source} do not match its manifest; delete "
            "corolla-manifest.json to recompute it"
        )
    with torch.device("meta"):  # the tensors are assigned below: no random init to throw away
        head, _ = checkpoint.family.build_head(checkpoint.config)
    state = {local: tensors[name] for local, name in wanted.items()}
    try:
        head.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"the client tensors of {checkpoint.source} do not fit the config: {error}"
        ) from error
    return head.float().eval()
