"""The client's share of a model: embeddings, final norm, LM head and tokenizer, nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from corolla.node.model.chat import chat_input_ids, chat_messages, load_tokenizer
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.families import Family, Head
from corolla.node.model.head import read_head
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

    def chat_ids(self, message: str, system: str | None = None) -> torch.Tensor:
        """[1, tokens]: ``message`` (after an optional ``system`` message) through the
        checkpoint's chat template; InvalidInput if the checkpoint has none."""
        return torch.tensor([chat_input_ids(self.tokenizer, chat_messages(message, system))])

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head.embed_tokens(input_ids)  # batch, seq -> batch, seq, hidden

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head.logits(hidden)  # batch, seq, hidden -> batch, seq, vocab


def load_head(model_dir: str | Path) -> ClientHead:
    """Load only the client-side tensors of a checkpoint, and its tokenizer."""
    checkpoint = Checkpoint(model_dir)
    manifest = load_manifest(checkpoint)
    head = read_head(checkpoint, manifest)  # checked against the manifest's head digest
    tokenizer = load_tokenizer(checkpoint.directory)
    return ClientHead(
        head=head,
        tokenizer=tokenizer,
        config=checkpoint.config,
        family=checkpoint.family,
        manifest=manifest,
        num_blocks=checkpoint.num_blocks,
        max_length=checkpoint.max_length,
    )
