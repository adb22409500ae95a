"""Tiny deterministic checkpoints (random weights from a seed) and an offline byte tokenizer.

They make every test and the demo runnable with no network: the same options always give the
same files, hence the same model digest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from corolla.errors import InvalidInput

__all__ = ["SPECIAL_TOKENS", "TinyModelConfig", "create_tiny_model", "save_byte_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 256, 257, 258
_VOCAB_SIZE = 264  # 256 bytes + specials, rounded up to a multiple of 8

Family = Literal["bloom", "llama"]


@dataclass(frozen=True)
class TinyModelConfig:
    family: Family = "bloom"
    num_layers: int = 8
    hidden_size: int = 256
    num_heads: int = 8
    num_kv_heads: int = 4  # llama only: grouped-query attention
    max_length: int = 512
    seed: int = 0
    # A wide init gives varied greedy tokens; the 0.02 default makes a random tiny model repeat
    # one token, which would make token-equality tests meaningless.
    initializer_range: float = 0.2

    def validate(self) -> None:
        if self.family not in ("bloom", "llama"):
            raise InvalidInput(f"unknown family {self.family!r} (choose bloom or llama)")
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "max_length"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name.replace('_', '-')} must be at least 1")
        if self.hidden_size % self.num_heads:
            raise InvalidInput("hidden-size must be a multiple of heads")
        if self.family == "llama" and self.num_heads % self.num_kv_heads:
            raise InvalidInput("heads must be a multiple of kv-heads")


def _hf_config(tiny: TinyModelConfig) -> PretrainedConfig:
    pad, bos, eos = 256, 257, 258
    if tiny.family == "bloom":
        return BloomConfig(
            vocab_size=_VOCAB_SIZE,
            hidden_size=tiny.hidden_size,
            n_layer=tiny.num_layers,
            n_head=tiny.num_heads,
            seq_length=tiny.max_length,
            initializer_range=tiny.initializer_range,
            pad_token_id=pad,
            bos_token_id=bos,
            eos_token_id=eos,
            tie_word_embeddings=True,
        )
    return LlamaConfig(
        vocab_size=_VOCAB_SIZE,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.hidden_size * 2,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        max_position_embeddings=tiny.max_length,
        initializer_range=tiny.initializer_range,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )


def create_tiny_model(directory: str | Path, tiny: TinyModelConfig | None = None) -> Path:
    """Write a deterministic checkpoint + tokenizer to `directory` and return its path."""
    tiny = tiny or TinyModelConfig()
    tiny.validate()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = _hf_config(tiny)
    torch.manual_seed(tiny.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(directory)
    save_byte_tokenizer(directory)
    (directory / "corolla-tiny.json").write_text(json.dumps(tiny.__dict__, indent=2))
    return directory


def _byte_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as ByteLevel pre-tokenizers use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols


def save_byte_tokenizer(directory: Path) -> None:
    """A byte-level BPE with no merges: 256 byte symbols plus specials; round-trips any UTF-8."""
    vocab = {symbol: byte for byte, symbol in _byte_symbols().items()}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(directory)
