"""Chained spans compute what transformers computes: logits and greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone, even_splits
from corolla.errors import SpanOutOfRange
from corolla.node.model.span import load_span

SPLITS = {
    "one span": [(0, 4)],
    "two spans": [(0, 2), (2, 4)],
    "uneven spans": [(0, 1), (1, 4)],
    "one block per span": [(0, 1), (1, 2), (2, 3), (3, 4)],
}
# A chunked prefill, a second chunk after cached tokens, then single-token decode steps.
CHUNKS = [(0, 7), (7, 12), *[(i, i + 1) for i in range(12, 20)]]


def _reference(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _span_logits(model_dir: Path, splits, input_ids: torch.Tensor) -> torch.Tensor:
    head = load_head(model_dir)
    backbone = LocalBackbone.load(model_dir, splits)
    outputs = []
    with backbone.inference_session(input_ids.shape[0], input_ids.shape[1]) as session:
        for start, end in CHUNKS:
            hidden = session.step(head.embed(input_ids[:, start:end]))
            outputs.append(head.logits(hidden))
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("split", list(SPLITS))
def test_chained_spans_match_a_full_transformers_forward(family_dir: Path, split: str, batch: int):
    input_ids = torch.randint(0, 256, (batch, 20), generator=torch.Generator().manual_seed(7))
    ours = _span_logits(family_dir, SPLITS[split], input_ids)
    with torch.inference_mode():
        full = _reference(family_dir)(input_ids).logits
    # Cached attention sums in another order than one full pass; transformers' own cached decode
    # differs from its full forward by ~1e-5 on these logits (magnitude ~10). So the tolerance
    # is 1e-5 of the logits' scale. Bit-exactness is the next test's claim.
    scale = max(1.0, float(full.abs().max()))
    torch.testing.assert_close(ours, full, atol=1e-5 * scale, rtol=0)


def test_chained_spans_are_bit_identical_to_transformers_with_the_same_cache_steps(
    family_dir: Path,
):
    input_ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(8))
    model = _reference(family_dir)
    cache = DynamicCache()
    with torch.inference_mode():
        reference = torch.cat(
            [
                model(input_ids[:, a:b], past_key_values=cache, use_cache=True).logits
                for a, b in CHUNKS
            ],
            dim=1,
        )
    ours = _span_logits(family_dir, SPLITS["uneven spans"], input_ids)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("split", list(SPLITS))
def test_greedy_generation_equals_transformers_generate(family_dir: Path, split: str):
    head = load_head(family_dir)
    prompts = ["Corolla runs models the BitTorrent way", "Petals promised points to volunteers"]
    input_ids = torch.tensor([head.tokenizer(p).input_ids[:30] for p in prompts])  # 2, 30
    config = GenerationConfig(max_new_tokens=40, stop_at_eos=False)
    ours = generate(head, LocalBackbone.load(family_dir, SPLITS[split]), input_ids, config)
    with torch.inference_mode():
        reference = _reference(family_dir).generate(
            input_ids, max_new_tokens=40, min_new_tokens=40, do_sample=False
        )[:, input_ids.shape[1] :]
    assert ours.shape == (2, 40)
    assert torch.equal(ours, reference)
    assert len(set(ours[0].tolist())) > 5, "the test model should not repeat one token"


def test_generation_streams_each_token_as_it_is_produced(bloom_dir: Path):
    head = load_head(bloom_dir)
    input_ids = head.tokenizer("stream me", return_tensors="pt").input_ids
    seen: list[int] = []
    tokens = generate(
        head,
        LocalBackbone.load(bloom_dir, [(0, 4)]),
        input_ids,
        GenerationConfig(max_new_tokens=12, stop_at_eos=False),
        on_tokens=lambda step: seen.append(int(step[0])),
    )
    assert seen == tokens[0].tolist()


def test_seeded_sampling_repeats_and_differs_across_seeds(bloom_dir: Path):
    head = load_head(bloom_dir)
    backbone = LocalBackbone.load(bloom_dir, even_splits(4, 2))
    input_ids = head.tokenizer("sample", return_tensors="pt").input_ids

    def run(seed: int) -> list[int]:
        config = GenerationConfig(
            max_new_tokens=24,
            do_sample=True,
            temperature=0.9,
            top_k=50,
            top_p=0.95,
            seed=seed,
            stop_at_eos=False,
        )
        return generate(head, backbone, input_ids, config)[0].tolist()

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_generation_stops_at_eos(bloom_dir: Path):
    head = load_head(bloom_dir)
    backbone = LocalBackbone.load(bloom_dir, [(0, 4)])
    input_ids = head.tokenizer("Corolla runs models", return_tensors="pt").input_ids
    config = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
    greedy = generate(head, backbone, input_ids, config)[0].tolist()
    # Declare the first token that is new after position 0 the end of text.
    stop_at = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    head.config.eos_token_id = greedy[stop_at]
    stopped = generate(head, backbone, input_ids, GenerationConfig(max_new_tokens=16))
    assert stopped[0].tolist() == greedy[: stop_at + 1]


def test_a_subspan_computes_what_a_span_loaded_for_those_blocks_computes(family_dir: Path):
    whole = load_span(family_dir, 0, 4)
    part, loaded = whole.subspan(1, 3), load_span(family_dir, 1, 3)
    assert part.digest == loaded.digest != whole.digest
    hidden = torch.randn(1, 6, whole.hidden_size, generator=torch.Generator().manual_seed(4))
    assert torch.equal(part.forward(hidden), loaded.forward(hidden))
    with pytest.raises(SpanOutOfRange):
        whole.subspan(2, 5)
