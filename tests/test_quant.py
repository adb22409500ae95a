"""int8 and NF4 spans run on the CPU, hold less memory than fp32, and stay near fp32 outputs.

Tolerances (relative L2 error of a 2-block span's output against fp32, measured on the test
models, written down in README.md): int8 < 0.05, NF4 < 0.5 (seen: ~0.02 and ~0.3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.errors import InvalidInput
from corolla.node.model.span import load_span

TOLERANCE = {"int8": 0.05, "nf4": 0.5}
MEMORY_AT_MOST = {"int8": 0.35, "nf4": 0.25}  # of fp32 weight bytes


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_span_uses_less_memory_and_stays_near_fp32(family_dir: Path, quant: str):
    fp32 = load_span(family_dir, 0, 2)
    quantized = load_span(family_dir, 0, 2, quant)
    assert quantized.weight_bytes() < MEMORY_AT_MOST[quant] * fp32.weight_bytes()
    hidden = torch.randn(2, 9, fp32.hidden_size, generator=torch.Generator().manual_seed(3))
    reference, output = fp32.forward(hidden), quantized.forward(hidden)
    assert output.shape == reference.shape and torch.isfinite(output).all()
    relative_error = float((output - reference).norm() / reference.norm())
    assert 0 < relative_error < TOLERANCE[quant]


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_spans_generate_text(bloom_dir: Path, quant: str):
    head = load_head(bloom_dir)
    backbone = LocalBackbone.load(bloom_dir, [(0, 2), (2, 4)], quant=quant)
    input_ids = head.tokenizer("quantized", return_tensors="pt").input_ids
    tokens = generate(head, backbone, input_ids, GenerationConfig(max_new_tokens=8))
    assert 1 <= tokens.shape[1] <= 8


def test_an_unknown_quantization_is_refused(bloom_dir: Path):
    with pytest.raises(InvalidInput, match="unknown quantization"):
        load_span(bloom_dir, 0, 1, "int3")
