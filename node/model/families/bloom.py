"""BLOOM: LayerNorm blocks with ALiBi position biases, fused QKV."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig
from transformers.models.bloom.modeling_bloom import BloomBlock, build_alibi_tensor

from corolla.node.model.families.base import Family, Head, KeyLayout, causal_mask

__all__ = ["BLOOM"]


@dataclass(frozen=True)
class _Bloom(Family):
    def num_blocks(self, config: PretrainedConfig) -> int:
        return config.n_layer

    def max_length(self, config: PretrainedConfig) -> int:
        # ALiBi has no learned positions; `seq_length` is the training context when present.
        return int(getattr(config, "seq_length", None) or 2048)

    def block_prefix(self, index: int) -> str:
        return f"transformer.h.{index}."

    def build_block(self, config: PretrainedConfig, index: int) -> nn.Module:
        return BloomBlock(config, layer_idx=index)

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
        total = past_length + new
        ones = torch.ones(batch, total, dtype=torch.long)
        alibi = build_alibi_tensor(ones, config.n_head, hidden.dtype)  # batch*heads, 1, total
        mask = causal_mask(batch, new, past_length, hidden.dtype)  # batch, 1, new, total
        for index, block in enumerate(blocks):
            if index and between is not None:
                between()
            hidden = block(
                hidden, alibi=alibi, attention_mask=mask, layer_past=cache, use_cache=True
            )[0]
        return hidden

    def build_head(self, config: PretrainedConfig) -> tuple[Head, dict[str, str]]:
        embed = nn.Embedding(config.vocab_size, config.hidden_size)
        head = Head(
            embed=embed,
            embed_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            final_norm=nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon),
            lm_head=nn.Linear(config.hidden_size, config.vocab_size, bias=False),
        )
        names = {
            "embed.weight": "transformer.word_embeddings.weight",
            "embed_norm.weight": "transformer.word_embeddings_layernorm.weight",
            "embed_norm.bias": "transformer.word_embeddings_layernorm.bias",
            "final_norm.weight": "transformer.ln_f.weight",
            "final_norm.bias": "transformer.ln_f.bias",
            "lm_head.weight": "lm_head.weight",
        }
        return head, names

    def tied_fallback(self) -> dict[str, str]:
        return {"lm_head.weight": "transformer.word_embeddings.weight"}


BLOOM = _Bloom(
    name="bloom",
    model_types=("bloom",),
    layouts=(
        KeyLayout("BloomForCausalLM", marker="transformer.word_embeddings.weight"),
        # bigscience/bloom-* (and Petals' test models) store BloomModel's keys: h.0..., ln_f...
        KeyLayout(
            "BloomModel (bigscience/bloom-*)",
            marker="word_embeddings.weight",
            renames=(("lm_head.", "lm_head."), ("", "transformer.")),
        ),
    ),
)
