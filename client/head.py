"""The client's share of a model: embeddings, final norm, LM head and tokenizer, nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from corolla.errors import CheckpointError
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.families import Family, Head
from corolla.node.model.manifest import Manifest, load_manifest

__all__ = ["ClientHead", "load_head"]


@dataclass
class ClientHead:
    """What a client holds locally to turn text into hidden states and hidden states into text."""

    head: Head
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    family: Family
    manifest: Manifest
    num_blocks: int
    max_length: int

    @property
    def model_digest(self) -> bytes:
        return self.manifest.model_digest

    @property
    def eos_token_id(self) -> int | None:
        value = self.config.eos_token_id
        return value[0] if isinstance(value, list) else value

    @property
    def pad_token_id(self) -> int:
        value = self.config.pad_token_id
        return value if value is not None else (self.eos_token_id or 0)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head.embed_tokens(input_ids)  # batch, seq -> batch, seq, hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.logits(hidden)  # batch, seq, hidden -> batch, seq, vocab


def load_head(model_dir: str | Path) -> ClientHead:
    """Load only the client-side tensors of a checkpoint, and its tokenizer."""
    checkpoint = Checkpoint(model_dir)
    family = checkpoint.family
    head, names = family.build_head(checkpoint.config)
    tied = family.tied_fallback() if checkpoint.config.tie_word_embeddings else {}
    wanted: dict[str, str] = {}
    for local_name, checkpoint_name in names.items():
        if not checkpoint.has(checkpoint_name) and checkpoint_name in tied:
            checkpoint_name = tied[checkpoint_name]
        wanted[local_name] = checkpoint_name
    tensors = checkpoint.read(set(wanted.values()))
    state = {local: tensors[name] for local, name in wanted.items()}
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"the client tensors do not fit the config: {error}") from error
    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint.directory)
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot load the tokenizer of {checkpoint.directory}: {error}"
        ) from error
    return ClientHead(
        head=head.float().eval(),
        tokenizer=tokenizer,
        config=checkpoint.config,
        family=family,
        manifest=load_manifest(checkpoint),
        num_blocks=checkpoint.num_blocks,
        max_length=checkpoint.max_length,
    )
