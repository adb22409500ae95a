"""Token generation over any backbone: greedy or sampled, streamed one step at a time.

The loop is the same for local spans and for the swarm; only the backbone's inference session
differs. Seeded sampling draws from a private torch.Generator, so a seed gives the same tokens
wherever the hidden states were computed.

After each draw the session is told what was drawn and how (:class:`Draw`: the tokens, and the
sampler's state before the draw), so that a spot-check can ask which token a verifier's
recomputation would have given (the head rule, :mod:`corolla.client.head_rule`). At the end
the session names the generated tokens whose steps no check covered
(:attr:`GenerationResult.unverified`); with ``require_checks`` such text is an error
(:class:`UnverifiedText`) instead of a result.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from corolla.client.head import ClientHead
from corolla.errors import InvalidInput, SessionError, UnverifiedText

__all__ = [
    "Backbone",
    "Draw",
    "GenerationConfig",
    "GenerationResult",
    "InferenceSession",
    "Rewind",
    "TokenRange",
    "UnverifiedText",
    "generate",
    "generate_result",
    "next_tokens",
]


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    seed: int | None = None
    stop_at_eos: bool = True

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidInput("max-new-tokens must be at least 1")
        if self.do_sample and not self.temperature > 0:
            raise InvalidInput("temperature must be positive")
        if self.top_k < 0:
            raise InvalidInput("top-k must be 0 (off) or positive")
        if not 0 < self.top_p <= 1:
            raise InvalidInput("top-p must be in (0, 1]")


class Rewind(Exception):
    """A session proved some of its earlier outputs wrong and recomputed them honestly.

    It now holds the first `kept` positions; `hidden` [batch, 1, hidden] is the honest output
    at position kept - 1. Whatever the caller derived from later outputs must be dropped.
    """

    def __init__(self, kept: int, hidden: torch.Tensor) -> None:
        super().__init__(f"rewound to {kept} positions")
        self.kept = kept
        self.hidden = hidden


@dataclass(frozen=True)
class Draw:
    """The tokens drawn from the last output position of a step, and how to draw them again."""

    tokens: torch.Tensor  # batch: what the user got
    done: torch.Tensor  # batch, bool: sequences already finished (padded, nothing was drawn)
    config: GenerationConfig
    sampler_state: torch.Tensor | None
    """The random generator's state right before the draw (sampling only)."""

    def again(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [batch, vocab] -> the tokens [batch] the same sampler state draws from them."""
        generator = None
        if self.sampler_state is not None:
            generator = torch.Generator()
            generator.set_state(self.sampler_state)
        return next_tokens(logits, self.config, generator)


@dataclass(frozen=True)
class TokenRange:
    """Generated tokens ``[start, end)`` (0 = the first new token) and why they are unverified."""

    start: int
    end: int
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"tokens": [self.start, self.end], "reason": self.reason}

    def describe(self) -> str:
        tokens = (
            f"token {self.start}"
            if self.end == self.start + 1
            else (f"tokens {self.start}-{self.end - 1}")
        )
        return f"{tokens}: {self.reason}"


@dataclass(frozen=True)
class GenerationResult:
    tokens: torch.Tensor  # batch, new
    unverified: tuple[TokenRange, ...]
    """Generated tokens whose steps no spot-check covered, and why (empty: all checked, or a
    local backbone, which is trusted)."""


class InferenceSession(Protocol):
    """One pass through all blocks, keeping caches between steps."""

    def step(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [batch, new, hidden] -> [batch, new, hidden], after all earlier steps.

        May raise Rewind.
        """
        ...

    def finish(self) -> None:
        """Called once no more steps are needed (pending checks are settled); may raise Rewind."""
        ...

    def drew(self, draw: Draw) -> None:
        """The tokens drawn from the output of the last step (or of a rewind)."""
        ...

    def unverified(self) -> tuple[TokenRange, ...]:
        """After ``finish``: the generated tokens whose steps went unchecked, and why."""
        ...


class Backbone(Protocol):
    """All transformer blocks of a model: local spans, or a chain of nodes in the swarm."""

    def inference_session(
        self, batch_size: int, max_length: int
    ) -> AbstractContextManager[InferenceSession]: ...


def next_tokens(
    logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch]."""
    if not config.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / config.temperature
    if config.top_k:
        kth = torch.topk(scores, min(config.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (cumulative - sorted_scores.softmax(dim=-1)) >= config.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probabilities = scores.softmax(dim=-1)  # batch, vocab
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def generate(
    head: ClientHead,
    backbone: Backbone,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
    on_rewind: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Generate up to `config.max_new_tokens` after input_ids [batch, prompt]; returns [batch, new].

    See :func:`generate_result`, which also says which tokens went unverified.
    """
    return generate_result(head, backbone, input_ids, config, on_tokens, on_rewind).tokens


def generate_result(
    head: ClientHead,
    backbone: Backbone,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    on_tokens: Callable[[torch.Tensor], None] | None = None,
    on_rewind: Callable[[int], None] | None = None,
    require_checks: bool = False,
) -> GenerationResult:
    """Generate up to `config.max_new_tokens` after input_ids [batch, prompt].

    `on_tokens` receives each step's new tokens [batch] as soon as they exist (for streaming).
    If the backbone proves earlier outputs wrong (Rewind), the tokens derived from them are
    dropped, `on_rewind` is told how many generated tokens were kept, and generation resumes
    from there with the sampler's state restored, so the result is what an honest run gives.
    A sequence that reached EOS is padded with the pad token until every sequence has.
    With `require_checks`, tokens whose steps went unchecked raise :class:`UnverifiedText`.
    """
    config.validate()
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InvalidInput("the prompt is empty: give at least one token")
    batch, prompt_length = input_ids.shape
    max_length = prompt_length + config.max_new_tokens
    if max_length > head.max_length:
        raise InvalidInput(
            f"prompt ({prompt_length} tokens) + max-new-tokens ({config.max_new_tokens}) exceeds "
            f"the model's context of {head.max_length} tokens"
        )
    generator = None
    if config.seed is not None:
        generator = torch.Generator().manual_seed(config.seed)
    eos = head.eos_token_id if config.stop_at_eos else None
    produced: list[torch.Tensor] = []  # one [batch] per step
    sampler_states: list[torch.Tensor] = []  # generator state before each token was drawn

    def finished() -> torch.Tensor:
        done = torch.zeros(batch, dtype=torch.bool)
        if eos is not None:
            for tokens in produced:
                done |= tokens == eos
        return done

    with backbone.inference_session(batch, max_length) as session:
        hidden = head.embed(input_ids)  # batch, prompt, hidden
        while True:
            try:
                if len(produced) == config.max_new_tokens or bool(finished().all()):
                    session.finish()
                    break
                output = session.step(hidden)  # batch, new, hidden
            except Rewind as rewind:
                kept = rewind.kept - prompt_length
                if kept < 0:
                    raise SessionError("a rewind may not drop prompt positions") from None
                del produced[kept:]
                if generator is not None and kept < len(sampler_states):
                    generator.set_state(sampler_states[kept])
                del sampler_states[kept:]
                if on_rewind is not None:
                    on_rewind(kept)
                output = rewind.hidden
            logits = head.logits(output[:, -1:, :])[:, -1, :]  # batch, vocab
            done = finished()
            if generator is not None:
                sampler_states.append(generator.get_state())
            state = _sampler_state(config, generator)
            tokens = next_tokens(logits, config, generator)  # batch
            tokens = torch.where(done, torch.full_like(tokens, head.pad_token_id), tokens)
            session.drew(Draw(tokens, done, config, state))
            produced.append(tokens)
            if on_tokens is not None:
                on_tokens(tokens)
            hidden = head.embed(tokens.unsqueeze(1))  # batch, 1, hidden
        unverified = session.unverified()
    if require_checks and unverified:
        raise UnverifiedText(unverified)
    return GenerationResult(torch.stack(produced, dim=1), unverified)


def _sampler_state(
    config: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor | None:
    """What drawing again needs: the private generator's state, or torch's global one."""
    if not config.do_sample:
        return None
    return generator.get_state() if generator is not None else torch.get_rng_state()
