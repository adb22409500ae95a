"""What a family adapter is: how to build and run blocks, and which tensors the client owns."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from corolla.errors import CheckpointError

__all__ = ["Family", "Head", "KeyLayout", "causal_mask", "sdpa_causal_mask"]


def causal_mask(
    batch_size: int, new_length: int, past_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [batch, 1, new, past + new]: 0 where a query may look, dtype-min elsewhere.

    Query i (at absolute position past + i) sees keys 0 .. past + i.
    """
    total = past_length + new_length
    query_positions = torch.arange(past_length, total).unsqueeze(1)  # new, 1
    key_positions = torch.arange(total).unsqueeze(0)  # 1, total
    blocked = key_positions > query_positions  # new, total
    mask = torch.zeros(new_length, total, dtype=dtype)
    mask.masked_fill_(blocked, torch.finfo(dtype).min)
    return mask.expand(batch_size, 1, new_length, total)


def sdpa_causal_mask(batch_size: int, new_length: int, past_length: int) -> torch.Tensor | None:
    """The mask transformers hands to SDPA: None when SDPA's own causal path applies (a prompt
    with no past, or one new token), else a boolean [batch, 1, new, past + new] (True = attend).

    Matching it keeps spans bit-identical to `from_pretrained` models, not merely close.
    """
    if past_length == 0 or new_length == 1:
        return None
    return causal_mask(batch_size, new_length, past_length, torch.float32) == 0


@dataclass(frozen=True)
class KeyLayout:
    """How one kind of published checkpoint names its tensors.

    Corolla names every tensor as the family's ``...ForCausalLM`` class does (its *canonical*
    names); a layout renames a stored key to that name by the first matching stored prefix.
    """

    name: str  # what writes checkpoints this way, e.g. "BloomModel (bigscience/bloom-*)"
    marker: str  # a stored key every checkpoint of this layout has
    renames: tuple[tuple[str, str], ...] = ()  # (stored prefix, canonical prefix), in order

    def canonical(self, stored: str) -> str:
        for stored_prefix, canonical_prefix in self.renames:
            if stored.startswith(stored_prefix):
                return canonical_prefix + stored.removeprefix(stored_prefix)
        return stored

    def describe(self) -> str:
        return f"{self.name}: {self.marker}"


class Head(nn.Module):
    """The client's part of a model: token embeddings in, logits out."""

    def __init__(
        self,
        embed: nn.Embedding,
        embed_norm: nn.Module | None,
        final_norm: nn.Module,
        lm_head: nn.Linear,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.embed_norm = embed_norm
        self.final_norm = final_norm
        self.lm_head = lm_head

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)  # batch, seq -> batch, seq, hidden
        return self.embed_norm(hidden) if self.embed_norm is not None else hidden

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.final_norm(hidden))  # batch, seq, hidden -> batch, seq, vocab


@dataclass(frozen=True)
class Family(ABC):
    """One model family. Subclasses are small: see bloom.py and llama.py."""

    name: str
    model_types: tuple[str, ...]
    # The key layouts of published checkpoints, the canonical one first.
    layouts: tuple[KeyLayout, ...]
    # The attention kernel transformers picks for this family by default, so spans compute
    # exactly what `from_pretrained` models do.
    attn_implementation: str = "eager"

    @abstractmethod
    def num_blocks(self, config: PretrainedConfig) -> int: ...

    @abstractmethod
    def max_length(self, config: PretrainedConfig) -> int:
        """Longest sequence (prompt + generated tokens) the model is meant to run on."""

    @abstractmethod
    def block_prefix(self, index: int) -> str:
        """Checkpoint key prefix of block `index`, ending with a dot."""

    @abstractmethod
    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module: ...

    def detect_layout(self, keys: Iterable[str], where: str) -> KeyLayout:
        """The layout whose marker key is among a checkpoint's stored keys."""
        stored = set(keys)
        for layout in self.layouts:
            if layout.marker in stored:
                return layout
        known = "; ".join(layout.describe() for layout in self.layouts)
        sample = ", ".join(sorted(stored)[:4]) or "none"
        raise CheckpointError(
            f"{where}: its tensor names fit no {self.name} checkpoint layout Corolla knows "
            f"({known}); its tensors are named like {sample}"
        )

    def position_encoder(self, config: PretrainedConfig) -> nn.Module | None:
        """A weightless module a span builds once and passes to every run (Llama: the rotary
        table); None for families that need none."""
        return None

    @abstractmethod
    def run_blocks(
        self,
        blocks: list[nn.Module],
        config: PretrainedConfig,
        hidden: torch.Tensor,
        cache: DynamicCache | None,
        past_length: int,
        between: Callable[[], None] | None = None,
        position_encoder: nn.Module | None = None,
    ) -> torch.Tensor:
        """Run `blocks` in order on hidden [batch, new, hidden] after `past_length` tokens,
        calling `between` (if given) after each block but the last. `position_encoder` is
        what :meth:`position_encoder` built for this config."""

    @abstractmethod
    def build_head(self, config: PretrainedConfig) -> tuple[Head, dict[str, str]]:
        """An empty head and the map {head state_dict key: checkpoint key} of the tensors it needs.

        A key whose checkpoint tensor is absent falls back to the tied embedding when the
        config ties word embeddings.
        """

    @abstractmethod
    def tied_fallback(self) -> dict[str, str]:
        """{checkpoint key: checkpoint key it is tied to} for tied weights that may be absent."""
