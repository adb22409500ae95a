"""Optional quantization of a span's linear layers with bitsandbytes (int8 or NF4), on the CPU."""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from corolla.errors import InvalidInput

__all__ = ["QUANT_MODES", "Quant", "module_bytes", "parse_quant", "quantize_linears"]

Quant = Literal["none", "int8", "nf4"]
QUANT_MODES: tuple[Quant, ...] = ("none", "int8", "nf4")


def parse_quant(text: str | None) -> Quant:
    value = (text or "none").lower()
    if value not in QUANT_MODES:
        raise InvalidInput(f"unknown quantization {text!r} (choose from {', '.join(QUANT_MODES)})")
    return value  # type: ignore[return-value]


def quantize_linears(module: nn.Module, quant: Quant) -> nn.Module:
    """Replace every nn.Linear inside `module` by its bitsandbytes counterpart, in place."""
    if quant == "none":
        return module
    import bitsandbytes as bnb  # imported lazily: slow, and noisy on import

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            has_bias = child.bias is not None
            if quant == "int8":
                replacement = bnb.nn.Linear8bitLt(
                    child.in_features,
                    child.out_features,
                    bias=has_bias,
                    has_fp16_weights=False,
                    threshold=0.0,
                )
                replacement.weight = bnb.nn.Int8Params(
                    child.weight.data.clone(), requires_grad=False, has_fp16_weights=False
                )
            else:
                replacement = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=has_bias,
                    quant_type="nf4",
                    compute_dtype=child.weight.dtype,
                )
                replacement.weight = bnb.nn.Params4bit(
                    child.weight.data.clone(), requires_grad=False, quant_type="nf4"
                )
            if has_bias:
                replacement.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            setattr(parent, name, replacement.to("cpu"))  # .to() performs the quantization
    return module


def module_bytes(module: nn.Module) -> int:
    """Bytes held by a module's weights, counting bitsandbytes scales and quantization state."""
    total = sum(t.numel() * t.element_size() for t in module.parameters())
    total += sum(t.numel() * t.element_size() for t in module.buffers())
    for parameter in module.parameters():
        total += _tensor_bytes(getattr(parameter, "SCB", None))
        state = getattr(parameter, "quant_state", None)
        while state is not None:
            total += _tensor_bytes(getattr(state, "absmax", None))
            total += _tensor_bytes(getattr(state, "code", None))
            state = getattr(state, "state2", None)
    return total


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
