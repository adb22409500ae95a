"""The spot-check tolerance: honest recomputation passes, cheating and perturbation fail.

An honest node runs a session with its KV cache (a chunked prefill, then one-token decode
steps); a verifier that loaded the same blocks on its own recomputes prefixes of the session in
one forward call, with other thread counts and batching, and every step up to the cut is
compared. Across the two families each profile sees more than 200 honest checked steps here.
The figures behind the thresholds come from benchmarks/tolerance_calibration.py.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from corolla.client.head import load_head
from corolla.errors import InvalidInput
from corolla.node.model.span import Span, load_span
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model
from corolla.verify.tolerance import (
    PROFILES,
    TOLERANCES,
    Comparison,
    compare,
    profile_of,
    token_errors,
)

QUANT = {"fp32": None, "int8": "int8", "nf4": "nf4"}
SMALLEST_DETECTED = 3e-3  # relative L2 size detected on every checked step in the calibration
PROMPT, CHUNK, DECODE = 19, 7, 50  # a prefill in two chunks, then 50 decode steps


@pytest.fixture(autouse=True)
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def wrong_model_dirs(
    tmp_path_factory: pytest.TempPathFactory, model_dirs: dict[str, Path]
) -> dict[str, Path]:
    """Each test model's config with another seed: same shapes, different weights."""
    root = tmp_path_factory.mktemp("wrong-models")
    wrong = {}
    for name, model_dir in model_dirs.items():
        tiny = TinyModelConfig(**json.loads((model_dir / "corolla-tiny.json").read_text()))
        wrong[name] = create_tiny_model(root / name, replace(tiny, seed=tiny.seed + 1))
    return wrong


def steps_of(prompt: int, chunk: int, decode: int) -> list[tuple[int, int]]:
    return [(0, chunk), (chunk, prompt)] + [(t, t + 1) for t in range(prompt, prompt + decode)]


def honest_session(
    model_dir: Path, profile: str, batch: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], Span]:
    """(inputs, node outputs, steps, verifier span) of one honest session over all blocks."""
    head = load_head(model_dir)
    node = load_span(model_dir, 0, head.num_blocks, QUANT[profile])
    verifier = load_span(model_dir, 0, head.num_blocks, QUANT[profile])
    steps = steps_of(PROMPT, CHUNK, DECODE)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, steps[-1][1]), generator=generator)
    inputs = head.embed(ids)  # batch, tokens, hidden
    torch.set_num_threads(1)
    cache = node.new_cache(batch)
    outputs = torch.cat([node.forward(inputs[:, a:b], cache) for a, b in steps], dim=1)
    return inputs, outputs, steps, verifier


def recompute(
    verifier: Span, inputs: torch.Tensor, end: int, *, threads: int, stacked: bool
) -> torch.Tensor:
    """The verifier's one forward call over the prefix, alone or batched with another prefix."""
    torch.set_num_threads(threads)
    prefix = inputs[:, :end]
    if stacked:
        other = torch.randn(1, end, prefix.shape[2], generator=torch.Generator().manual_seed(end))
        prefix = torch.cat([prefix, other])
    return verifier.forward(prefix)[: inputs.shape[0]]


@functools.cache
def checked_pairs(
    model_dir: Path, profile: str, batch: int = 1, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(claimed, recomputed) of every checked step, over three recomputations of the session.

    Cached: several tests read the same honest session (and never modify its tensors).
    """
    inputs, outputs, steps, verifier = honest_session(model_dir, profile, batch, seed)
    pairs = []
    for cut, threads, stacked in ((len(steps) - 1, 2, False), (34, 1, True), (17, 2, True)):
        recomputed = recompute(verifier, inputs, steps[cut][1], threads=threads, stacked=stacked)
        pairs += [(outputs[:, a:b], recomputed[:, a:b]) for a, b in steps[: cut + 1]]
    return pairs


@pytest.mark.parametrize("profile", list(TOLERANCES))
def test_honest_cached_decode_passes_against_one_shot_recomputation(family_dir: Path, profile: str):
    pairs = checked_pairs(family_dir, profile, batch=2 if profile == "fp32" else 1)
    verdicts = [compare(claimed, recomputed, profile) for claimed, recomputed in pairs]
    assert len(verdicts) >= 100  # x 2 families: over 200 honest checked steps per profile
    assert all(verdict.passed for verdict in verdicts), max(v.score for v in verdicts)


@pytest.mark.parametrize("profile", list(TOLERANCES))
def test_noise_of_the_smallest_detected_size_fails_every_checked_step(
    family_dir: Path, profile: str
):
    generator = torch.Generator().manual_seed(5)
    for claimed, recomputed in checked_pairs(family_dir, profile)[::4]:
        bad = claimed + relative_noise(claimed, SMALLEST_DETECTED, generator)
        assert not compare(bad, recomputed, profile).passed


def relative_noise(claimed: torch.Tensor, size: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise whose L2 norm is `size` times each token's norm."""
    noise = torch.randn(claimed.shape, generator=generator)
    return noise * size * claimed.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True)


def test_noise_below_the_threshold_is_not_detected(bloom_dir: Path):
    generator = torch.Generator().manual_seed(6)
    for claimed, recomputed in checked_pairs(bloom_dir, "fp32")[::8]:
        bad = claimed + relative_noise(claimed, 1e-4, generator)
        assert compare(bad, recomputed, "fp32").passed


def adversary_outputs(
    spans: dict[str, Span], wrong: Span, profile: str, inputs: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What each cheating node returns for `inputs` instead of spans[profile]'s output."""
    span = spans[profile]
    cheats = {"lazy: echo input": inputs, "wrong model": wrong.forward(inputs)}
    if span.num_blocks > 1:
        cheats["lazy: skip last block"] = span.subspan(span.start, span.end - 1).forward(inputs)
    for other, other_span in spans.items():
        if other != profile:
            cheats[f"{other} claiming {profile}"] = other_span.forward(inputs)
    return cheats


@pytest.mark.parametrize("profile", list(TOLERANCES))
@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_every_adversary_fails_every_checked_step(
    model_dirs: dict[str, Path], wrong_model_dirs: dict[str, Path], family: str, profile: str
):
    model_dir = model_dirs[family]
    head = load_head(model_dir)
    n = head.num_blocks
    full = {name: load_span(model_dir, 0, n, QUANT[name]) for name in TOLERANCES}
    wrong = load_span(wrong_model_dirs[family], 0, n, QUANT[profile])
    steps = steps_of(9, 4, 6)
    ids = torch.randint(0, 256, (1, steps[-1][1]), generator=torch.Generator().manual_seed(7))
    embedded = head.embed(ids)  # 1, tokens, hidden
    # All blocks, and the last block alone: one block is the hardest span to catch cheating on.
    for start in (0, n - 1):
        spans = {name: span.subspan(start, n) for name, span in full.items()}
        inputs = full["fp32"].subspan(0, start).forward(embedded) if start else embedded
        recomputed = load_span(model_dir, start, n, QUANT[profile]).forward(inputs)
        cheats = adversary_outputs(spans, wrong.subspan(start, n), profile, inputs)
        for name, claimed in cheats.items():
            for a, b in steps:
                verdict = compare(claimed[:, a:b], recomputed[:, a:b], profile)
                assert not verdict.passed, (start, name, a, verdict.score)


def test_quantized_weights_and_outputs_are_deterministic_across_loads_and_batches(
    family_dir: Path,
):
    for quant in ("int8", "nf4"):
        torch.set_num_threads(1)
        first = load_span(family_dir, 0, 2, quant)
        torch.set_num_threads(2)
        second = load_span(family_dir, 0, 2, quant)
        for a, b in zip(
            first.blocks.state_dict().values(), second.blocks.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b)
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(1, 12, first.hidden_size, generator=generator)
        alone = first.forward(x)
        batched = second.forward(torch.cat([x, torch.randn(x.shape, generator=generator)]))[:1]
        assert torch.equal(alone, batched)


# --- the comparison function itself ---------------------------------------------------------


def test_score_is_the_largest_per_token_relative_error():
    recomputed = torch.ones(1, 3, 4)
    claimed = recomputed.clone()
    claimed[0, 1, 0] += 0.02  # token 1: ||d|| = 0.02, ||claimed|| ~ 2.01
    verdict = compare(claimed, recomputed, "fp32")
    assert verdict.worst_token == 1
    assert verdict.token_scores[0] == verdict.token_scores[2] == 0.0
    assert verdict.score == pytest.approx(0.02 / float(claimed[0, 1].norm()))
    assert not verdict.passed and verdict.threshold == TOLERANCES["fp32"].threshold
    assert "exceeds" in verdict.describe() and "fp32" in verdict.describe()


def test_score_is_scale_invariant_and_symmetric():
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(2, 5, 16, generator=generator)
    a = b + 1e-4 * torch.randn(b.shape, generator=generator)
    score = compare(a, b, "int8").score
    assert compare(1024 * a, 1024 * b, "int8").score == pytest.approx(score, rel=1e-12)
    assert compare(b, a, "int8").score == pytest.approx(score, rel=1e-12)
    threshold = TOLERANCES["nf4"].threshold
    assert compare(b, b, "nf4") == Comparison("nf4", True, 0.0, threshold, (0.0,) * 10, 0)


def test_zero_tokens_on_both_sides_score_zero():
    zeros = torch.zeros(1, 2, 8)
    assert token_errors(zeros, zeros).tolist() == [[0.0, 0.0]]
    assert compare(zeros, zeros, "fp32").passed


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_claimed_output_fails_without_crashing(bad: float):
    recomputed = torch.randn(1, 4, 8)
    claimed = recomputed.clone()
    claimed[0, 2, 3] = bad
    verdict = compare(claimed, recomputed, "fp32")
    assert not verdict.passed
    assert verdict.score == math.inf and verdict.worst_token == 2
    assert verdict.token_scores[0] == 0.0


def test_a_non_finite_recomputation_is_refused():
    claimed = torch.randn(1, 4, 8)
    recomputed = claimed.clone()
    recomputed[0, 0, 0] = math.nan
    with pytest.raises(InvalidInput, match="recomputed output holds NaN"):
        compare(claimed, recomputed, "fp32")


@pytest.mark.parametrize(
    ("claimed", "recomputed", "message"),
    [
        (torch.zeros(1, 4, 8), torch.zeros(1, 5, 8), "differs from recomputed shape"),
        (torch.zeros(4, 8), torch.zeros(1, 4, 8), "differs from recomputed shape"),
        (torch.zeros(1, 4, 8, dtype=torch.float64), torch.zeros(1, 4, 8), "float64"),
        (torch.zeros(1, 4, 8), torch.zeros(1, 4, 8, dtype=torch.float16), "float16"),
        (torch.zeros(1, 4, 8, dtype=torch.int64), torch.zeros(1, 4, 8), "int64"),
        (torch.zeros(1, 0, 8), torch.zeros(1, 0, 8), "empty"),
        (torch.tensor(1.0), torch.tensor(1.0), "no hidden dimension"),
        ([1.0, 2.0], torch.zeros(2), "must be a tensor"),
    ],
)
def test_mismatched_or_malformed_tensors_are_refused(claimed, recomputed, message: str):
    with pytest.raises(InvalidInput, match=message):
        compare(claimed, recomputed, "fp32")


def test_an_unknown_profile_is_refused():
    with pytest.raises(InvalidInput, match="unknown compute profile"):
        compare(torch.zeros(1, 1, 4), torch.zeros(1, 1, 4), "fp16")


def test_profiles_map_announced_dtype_and_quantization():
    assert profile_of("float32", "none") == "fp32"
    assert profile_of("torch.float32", "INT8") == "int8"
    assert profile_of("float32", "nf4") == "nf4"
    assert set(PROFILES.values()) == set(TOLERANCES)
    with pytest.raises(InvalidInput, match="no tolerance"):
        profile_of("float16", "none")
