"""A span: blocks [start, end) of a model, loaded from a checkpoint and run with a KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from corolla.errors import CheckpointError, InvalidInput, MissingTensor, SpanOutOfRange
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.families import Family
from corolla.node.model.manifest import Manifest, block_digest, load_manifest
from corolla.node.model.quant import Quant, module_bytes, parse_quant, quantize_linears

__all__ = ["BetweenBlocks", "Span", "SpanCache", "load_span"]

BetweenBlocks = Callable[[], None]
"""Called after each block of a forward pass (a node runs waiting ticketed work there)."""


@dataclass
class SpanCache:
    """The keys and values one session has stored in a span's blocks."""

    batch_size: int
    past_length: int = 0
    cache: DynamicCache = field(default_factory=DynamicCache)


class Span:
    """Blocks [start, end) of one model, ready to run. Hidden states in, hidden states out."""

    def __init__(
        self,
        *,
        family: Family,
        config: PretrainedConfig,
        blocks: nn.ModuleList,
        start: int,
        end: int,
        model_digest: bytes,
        manifest: Manifest,
        quant: Quant,
    ) -> None:
        self.family = family
        self.config = config
        self.blocks = blocks
        self.start = start
        self.end = end
        self.model_digest = model_digest
        self.manifest = manifest
        self.digest = manifest.span_digest(start, end)
        self.quant = quant
        self.hidden_size: int = config.hidden_size
        self.dtype = torch.float32
        self.max_length = family.max_length(config)
        # Built from this span's own config and kept with it (never shared by a key that could
        # outlive the config, such as its id).
        self.position_encoder = family.position_encoder(config)

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def subspan(self, start: int, end: int) -> Span:
        """Blocks [start, end) of this span, sharing its weights (a route may use a part)."""
        if not self.start <= start < end <= self.end:
            raise SpanOutOfRange(
                f"blocks {start}:{end} are not inside this span {self.start}:{self.end}"
            )
        if (start, end) == (self.start, self.end):
            return self
        return Span(
            family=self.family,
            config=self.config,
            blocks=nn.ModuleList(self.blocks[start - self.start : end - self.start]),
            start=start,
            end=end,
            model_digest=self.model_digest,
            manifest=self.manifest,
            quant=self.quant,
        )

    def new_cache(self, batch_size: int) -> SpanCache:
        return SpanCache(batch_size=batch_size)

    def weight_bytes(self) -> int:
        return module_bytes(self.blocks)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        cache: SpanCache | None = None,
        between: BetweenBlocks | None = None,
    ) -> torch.Tensor:
        """hidden [batch, new, hidden_size] -> [batch, new, hidden_size]; advances `cache`.

        Without a cache, runs a one-shot forward over the whole sequence (no state kept).
        `between`, if given, is called after each block but the last.
        """
        self.check_hidden(hidden)
        batch, new, _ = hidden.shape
        if cache is None:
            cache = self.new_cache(batch)
        elif cache.batch_size != batch:
            raise InvalidInput(f"batch of {batch} sent to a session of batch {cache.batch_size}")
        if cache.past_length + new > self.max_length:
            raise InvalidInput(
                f"{cache.past_length + new} tokens exceed the model's context of {self.max_length}"
            )
        output = self.family.run_blocks(
            list(self.blocks),
            self.config,
            hidden,
            cache.cache,
            cache.past_length,
            between,
            self.position_encoder,
        )
        cache.past_length += new
        return output

    def check_hidden(self, hidden: torch.Tensor) -> None:
        if hidden.dim() != 3 or hidden.shape[0] < 1 or hidden.shape[1] < 1:
            raise InvalidInput(f"hidden states must be [batch, tokens, hidden], got {hidden.shape}")
        if hidden.shape[2] != self.hidden_size:
            raise InvalidInput(
                f"hidden size {hidden.shape[2]} does not match the model's {self.hidden_size}"
            )
        if hidden.dtype != self.dtype:
            raise InvalidInput(f"hidden states must be {self.dtype}, got {hidden.dtype}")


def load_span(
    model_dir: str | Path,
    start: int,
    end: int,
    quant: str | None = None,
) -> Span:
    """Load blocks [start, end) of a checkpoint (a directory or a hub id), reading only those
    blocks' tensors and checking each block against the manifest."""
    checkpoint = Checkpoint(model_dir)
    checkpoint.check_span(start, end)
    quant_mode = parse_quant(quant)
    manifest = load_manifest(checkpoint)
    family = checkpoint.family
    blocks = nn.ModuleList()
    for index in range(start, end):
        prefix = family.block_prefix(index)
        names = checkpoint.block_tensor_names(index)
        tensors = checkpoint.read(names)
        if block_digest(index, tensors, prefix) != manifest.block_digests[index]:
            raise CheckpointError(
                f"block {index} of {checkpoint.source} does not match its manifest; "
                "delete corolla-manifest.json to recompute it"
            )
        block = family.build_block(checkpoint.config, index)
        state = {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}
        _load_exact(block, state, f"block {index}")
        blocks.append(quantize_linears(block.float().eval(), quant_mode))
    return Span(
        family=family,
        config=checkpoint.config,
        blocks=blocks,
        start=start,
        end=end,
        model_digest=manifest.model_digest,
        manifest=manifest,
        quant=quant_mode,
    )


def _load_exact(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """load_state_dict that names missing or unexpected tensors in a CheckpointError."""
    expected = set(module.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise MissingTensor(f"{what} is missing tensors: {', '.join(missing)}")
    try:
        module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{what} does not fit the config: {error}") from error
