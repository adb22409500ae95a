"""Llama: RMSNorm blocks with rotary positions and grouped-query attention."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from corolla.node.model.families.base import Family, Head, KeyLayout, sdpa_causal_mask

__all__ = ["LLAMA"]


@dataclass(frozen=True)
class _Llama(Family):
    def num_blocks(self, config: PretrainedConfig) -> int:
        return config.num_hidden_layers

    def max_length(self, config: PretrainedConfig) -> int:
        return int(config.max_position_embeddings)

    def block_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        return LlamaDecoderLayer(config, layer_idx=index)

    def position_encoder(self, config: PretrainedConfig) -> nn.Module:
        # The rotary table holds no weights; it is made from the config's rope settings
        # (rope_parameters, or a legacy rope_scaling that transformers turned into them).
        return LlamaRotaryEmbedding(config)

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
        batch, new, _ = hidden.shape  # batch, new tokens, hidden
        positions = torch.arange(past_length, past_length + new).expand(batch, new)
        rotary = position_encoder or self.position_encoder(config)
        cos, sin = rotary(hidden, positions)  # batch, new, head_dim each
        mask = sdpa_causal_mask(batch, new, past_length)  # None or batch, 1, new, total
        for index, block in enumerate(blocks):
            if index and between is not None:
                between()
            hidden = block(
                hidden,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=(cos, sin),
            )
        return hidden

    def build_head(self, config: PretrainedConfig) -> tuple[Head, dict[str, str]]:
        head = Head(
            embed=nn.Embedding(config.vocab_size, config.hidden_size),
            embed_norm=None,
            final_norm=LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps),
            lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        )
        names = {
            "embed.weight": "model.embed_tokens.weight",
            "final_norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight",
        }
        return head, names

    def tied_fallback(self) -> dict[str, str]:
        return {"lm_head.weight": "model.embed_tokens.weight"}


LLAMA = _Llama(
    name="llama",
    model_types=("llama",),
    layouts=(
        # Tied checkpoints (SmolLM2, ...) simply have no lm_head.weight: see tied_fallback.
        KeyLayout("LlamaForCausalLM", marker="model.embed_tokens.weight"),
        KeyLayout(
            "LlamaModel (no model. prefix)",
            marker="embed_tokens.weight",
            renames=(("lm_head.", "lm_head."), ("", "model.")),
        ),
    ),
    attn_implementation="sdpa",
)
