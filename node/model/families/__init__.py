"""Model families: one small adapter per architecture.

A family knows how to build one transformer block, run a list of blocks with a KV cache, which
tensors belong to the client (embeddings, final norm, LM head), and the key layouts its
published checkpoints use. Adding a family is one
file: subclass :class:`Family`, then add the instance to ``FAMILIES``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from corolla.errors import UnsupportedModel
from corolla.node.model.families.base import (
    Family,
    Head,
    KeyLayout,
    causal_mask,
    sdpa_causal_mask,
)
from corolla.node.model.families.bloom import BLOOM
from corolla.node.model.families.llama import LLAMA

__all__ = [
    "FAMILIES",
    "Family",
    "Head",
    "KeyLayout",
    "causal_mask",
    "family_for",
    "sdpa_causal_mask",
]

FAMILIES: dict[str, Family] = {family.name: family for family in (BLOOM, LLAMA)}


def family_for(config: PretrainedConfig) -> Family:
    """The family adapter for a config's `model_type`, or UnsupportedModel."""
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = ", ".join(sorted(t for f in FAMILIES.values() for t in f.model_types))
    raise UnsupportedModel(f"unsupported model type {model_type!r} (supported: {supported})")
