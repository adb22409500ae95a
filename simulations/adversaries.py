"""Dishonest node behaviours: what a malicious node does instead of its honest computation.

Each strategy is a :class:`~corolla.node.behaviour.Behaviour` the node service computes through.
Caught by receipt checks alone (they exist for the swarm's failover tests):

- ``wrong-key``    signs receipts with a key other than the one it announced;
- ``bad-digest``   returns an output different from the one its (validly signed) receipt names.

Consistent liars, which sign exactly what they return (only a spot-check, a recomputation on a
second peer, can catch them):

- ``noise``        adds Gaussian noise of ``perturbation`` (default 0.5) times each token's RMS;
- ``subtle``       the same with a small ``perturbation`` (default 1e-2): the spot-check score of
                   a cheated step (per-token relative L2 error) is about ``perturbation``;
- ``lazy``         skips its blocks: echoes the input hidden states as its output;
- ``wrong-model``  runs the same blocks of another checkpoint (``wrong_model``) while it announces
                   the real span digest;
- ``wrong-quant``  computes with its blocks quantized (``wrong_quant``: nf4 or int8) while it
                   announces the quantization it was started with (none: fp32) in its DHT record
                   and ``rpc_info``;
- ``selective``    wraps another strategy (``cheat_with``, default noise): cheats on a fraction of
                   steps (``cheat_fraction``) and/or only for clients whose public key starts with
                   ``target_client`` (hex); honest everywhere else.

Neither a liar nor honest, for the failover tests:

- ``hang``         answers the first steps of every session (the prefill and two more), then
                   accepts each later step and never answers it: only the client's step timeout
                   notices. Its compute thread is held, so whatever queues behind it waits too.

Random choices (noise, which steps a selective node cheats on) are a function of ``seed``, the
request's session id and step, so a run is reproducible and a retried step gets the same answer.
"""

from __future__ import annotations

import copy
import hashlib
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from corolla.errors import InvalidInput
from corolla.node.behaviour import Behaviour
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.quant import parse_quant, quantize_linears
from corolla.node.model.span import BetweenBlocks, Span, SpanCache, load_span
from corolla.simulations.verifier_adversaries import (
    ColludingNode,
    ColludingVerifier,
    LyingVerifier,
    Steering,
    colluding_node,
    colluding_verifier,
    lying_verifier,
    steering,
)
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, StepRequest, make_receipt

__all__ = [
    "ADVERSARIES",
    "AdversaryOptions",
    "BadDigest",
    "Hang",
    "Lazy",
    "Noise",
    "Selective",
    "Subtle",
    "WrongKey",
    "WrongModel",
    "WrongQuant",
    "make_behaviour",
]


@dataclass(frozen=True)
class AdversaryOptions:
    """Settings of the strategies (``corolla simulate node`` options); None means not given."""

    perturbation: float | None = None
    """noise, subtle: noise size relative to each token's RMS."""
    cheat_with: str | None = None
    """selective: the strategy used on the steps it cheats on (default noise)."""
    cheat_fraction: float | None = None
    """selective: share of steps it cheats on (default 1: every step of its targets)."""
    target_client: str | None = None
    """selective: cheat only for clients whose public key starts with this hex prefix."""
    wrong_model: Path | None = None
    """wrong-model: the checkpoint whose weights it computes with."""
    wrong_quant: str | None = None
    """wrong-quant: the quantization it computes with (default nf4)."""
    seed: int | None = None
    """noise, subtle, bad-digest, selective, colluding-node: seed of the random choices
    (default 0; a colluding pair's operator gives its node the seed of its corruption)."""
    accomplice: str | None = None
    """colluding-verifier: the public key (hex) of the node it signs 'passed' for."""
    target_node: str | None = None
    """lying-verifier: sign 'failed' only against this node's public key (hex; default all)."""
    steer_token: int | None = None
    """steering: the token id it pushes the text towards."""
    steer_model: Path | None = None
    """steering: the checkpoint whose final norm and LM head it steers with (its own model)."""


def _draw(seed: int, purpose: str, request: StepRequest) -> int:
    """A 63-bit number fixed by the seed, the purpose, the session and the step."""
    hasher = hashlib.blake2b(digest_size=8, person=b"corolla-adverse")
    for part in (seed.to_bytes(8, "big", signed=True), purpose.encode(), request.session_id):
        hasher.update(len(part).to_bytes(4, "big") + part)
    hasher.update(request.step.to_bytes(8, "big"))
    return int.from_bytes(hasher.digest(), "big") >> 1


def _noise_like(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tensor.shape, generator=generator, dtype=torch.float32)


class WrongKey(Behaviour):
    """Signs every receipt with a fresh key, not the announced one."""

    name = "wrong-key"

    def __init__(self) -> None:
        self.other = Identity.generate()

    def sign_receipt(
        self, identity: Identity, request: StepRequest, output_digest: bytes, previous: bytes
    ) -> Receipt:
        return make_receipt(self.other, request, output_digest, previous)


class BadDigest(Behaviour):
    """Signs the honest output's digest but sends a slightly different tensor."""

    name = "bad-digest"

    def __init__(self, scale: float = 1e-3, seed: int = 0) -> None:
        self.scale = scale
        self.seed = seed

    def sent(self, step: int, request: StepRequest, output: torch.Tensor) -> torch.Tensor:
        noise = _noise_like(output, _draw(self.seed, self.name, request))
        return output + (noise * self.scale).to(output.dtype)


class Noise(Behaviour):
    """Adds Gaussian noise of ``perturbation`` times each token's RMS; the receipt matches it.

    hidden [batch, tokens, hidden]: token (b, t) gets ``randn(hidden) * p * rms(honest[b, t])``,
    so its relative L2 error (the spot-check score) is about ``p``.
    """

    name = "noise"
    default_perturbation = 0.5

    def __init__(self, perturbation: float | None = None, seed: int = 0) -> None:
        size = self.default_perturbation if perturbation is None else perturbation
        if not 0 < size < 1e6:
            raise InvalidInput(f"--perturbation must be a positive size, not {size!r}")
        self.perturbation = size
        self.seed = seed

    def describe(self) -> str:
        return f"{self.name} (Gaussian, {self.perturbation:g} x each token's RMS, seed {self.seed})"

    def output(
        self, step: int, request: StepRequest, hidden_in: torch.Tensor, honest: torch.Tensor
    ) -> torch.Tensor:
        rms = honest.float().pow(2).mean(dim=-1, keepdim=True).sqrt()  # [batch, tokens, 1]
        noise = _noise_like(honest, _draw(self.seed, "noise", request))
        return honest + (noise * rms * self.perturbation).to(honest.dtype)


class Subtle(Noise):
    """:class:`Noise` of a small relative size: just above or below the tolerance, by choice."""

    name = "subtle"
    default_perturbation = 1e-2


class Lazy(Behaviour):
    """Skips its blocks: returns the input hidden states as its output.

    It still runs the blocks behind the scenes, so that its session's cache stays whole when a
    selective node is honest on the next step; what the client sees is the echo.
    """

    name = "lazy"

    def output(
        self, step: int, request: StepRequest, hidden_in: torch.Tensor, honest: torch.Tensor
    ) -> torch.Tensor:
        return hidden_in.clone()


class _Substitute(Behaviour):
    """Computes with other blocks standing in for the node's span (same indices and shapes)."""

    def __init__(self) -> None:
        self.substitute: Span | None = None

    def make_substitute(self, span: Span) -> Span:
        raise NotImplementedError

    def attach(self, span: Span) -> None:
        self.substitute = self.make_substitute(span)

    def compute(
        self,
        request: StepRequest,
        span: Span,
        hidden: torch.Tensor,
        cache: SpanCache | None,
        between: BetweenBlocks | None = None,
    ) -> torch.Tensor:
        if self.substitute is None:
            raise InvalidInput(f"the {self.name} adversary was never attached to a span")
        # The session's cache holds the substitute's keys and values: a consistent wrong model.
        return self.substitute.subspan(span.start, span.end).forward(hidden, cache, between)


class WrongModel(_Substitute):
    """Runs the same blocks of another checkpoint; announces (and names in receipts) the real
    span's digest."""

    name = "wrong-model"

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = Path(directory)
        Checkpoint(self.directory)  # a bad directory fails now, before the node joins the swarm

    def describe(self) -> str:
        return f"{self.name} (computes with the weights of {self.directory})"

    def make_substitute(self, span: Span) -> Span:
        other = load_span(self.directory, span.start, span.end, span.quant)
        if (other.family.name, other.hidden_size) != (span.family.name, span.hidden_size):
            raise InvalidInput(
                f"--wrong-model {self.directory} is a {other.family.name} model of hidden size "
                f"{other.hidden_size}; the node serves {span.family.name} of {span.hidden_size}"
            )
        if other.digest == span.digest:
            raise InvalidInput(f"--wrong-model {self.directory} has the node's own weights")
        return other


class WrongQuant(_Substitute):
    """Computes with its blocks quantized while announcing the quantization it was started with.

    The substitute is the node's own fp32 blocks quantized as ``load_span`` would, so its outputs
    are exactly what an honest node started with ``--quant <quant>`` returns.
    """

    name = "wrong-quant"

    def __init__(self, quant: str = "nf4") -> None:
        super().__init__()
        self.quant = parse_quant(quant)
        if self.quant == "none":
            raise InvalidInput("--wrong-quant must be nf4 or int8")

    def describe(self) -> str:
        return f"{self.name} (computes with {self.quant}, announces what --quant says)"

    def make_substitute(self, span: Span) -> Span:
        if span.quant != "none":
            raise InvalidInput(
                f"the wrong-quant adversary needs an unquantized node (--quant none), not "
                f"--quant {span.quant}"
            )
        blocks = copy.deepcopy(span.blocks)
        for block in blocks:
            quantize_linears(block, self.quant)
        return Span(
            family=span.family,
            config=span.config,
            blocks=blocks,
            start=span.start,
            end=span.end,
            model_digest=span.model_digest,
            manifest=span.manifest,
            quant=self.quant,
        )


class Selective(Behaviour):
    """Cheats with ``inner`` on some steps only; honest on the others.

    A step is cheated on when the client's key starts with ``target_client`` (if given) and a
    draw fixed by the seed, the session and the step falls under ``fraction``.
    """

    name = "selective"

    def __init__(
        self,
        inner: Behaviour,
        fraction: float = 1.0,
        target_client: str | None = None,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise InvalidInput(f"--cheat-fraction must be in [0, 1], not {fraction!r}")
        if target_client is not None:
            target_client = target_client.lower()
            if not 0 < len(target_client) <= 64 or set(target_client) - set(string.hexdigits):
                raise InvalidInput("--target-client must be a hex prefix of a public key")
        self.inner = inner
        self.fraction = fraction
        self.target_client = target_client
        self.seed = seed
        self.honest = Behaviour()

    def describe(self) -> str:
        whom = f"clients {self.target_client}..." if self.target_client else "every client"
        return (
            f"{self.name}: {self.inner.describe()} on {self.fraction:.0%} of the steps of "
            f"{whom}, honest otherwise (seed {self.seed})"
        )

    def cheats_on(self, request: StepRequest) -> bool:
        if self.target_client and not request.client_key.hex().startswith(self.target_client):
            return False
        if self.fraction >= 1.0:
            return True
        return _draw(self.seed, self.name, request) / 2**63 < self.fraction

    def _for(self, request: StepRequest) -> Behaviour:
        return self.inner if self.cheats_on(request) else self.honest

    def attach(self, span: Span) -> None:
        self.inner.attach(span)

    def compute(
        self,
        request: StepRequest,
        span: Span,
        hidden: torch.Tensor,
        cache: SpanCache | None,
        between: BetweenBlocks | None = None,
    ) -> torch.Tensor:
        return self._for(request).compute(request, span, hidden, cache, between)

    def output(
        self, step: int, request: StepRequest, hidden_in: torch.Tensor, honest: torch.Tensor
    ) -> torch.Tensor:
        return self._for(request).output(step, request, hidden_in, honest)

    def sign_receipt(
        self, identity: Identity, request: StepRequest, output_digest: bytes, previous: bytes
    ) -> Receipt:
        return self._for(request).sign_receipt(identity, request, output_digest, previous)

    def sent(self, step: int, request: StepRequest, output: torch.Tensor) -> torch.Tensor:
        return self._for(request).sent(step, request, output)


class Hang(Behaviour):
    """Answers steps ``0 .. answered - 1`` of every session, then holds each later step.

    A held step was accepted (checked, queued, handed to the compute thread) and is never
    answered: no reply, no error, the stream stays open. One-shot forwards are step 0, so they
    are answered while the compute thread is free. ``release()`` lets the held steps finish
    (in-process tests call it to end cleanly); nothing releases them in a node process, which
    therefore does not exit on SIGTERM while a step is held: stop it with SIGKILL.
    """

    name = "hang"

    def __init__(self, answered: int = 3) -> None:
        if answered < 0:
            raise InvalidInput(f"a hanging node answers 0 or more steps, not {answered!r}")
        self.answered = answered
        self.held = 0
        """Steps held so far (counted when the hold begins)."""
        self._released = threading.Event()

    def describe(self) -> str:
        return f"{self.name} (answers the first {self.answered} steps of a session, then hangs)"

    def release(self) -> None:
        """Let every held step (and every later one) run to its answer."""
        self._released.set()

    def compute(
        self,
        request: StepRequest,
        span: Span,
        hidden: torch.Tensor,
        cache: SpanCache | None,
        between: BetweenBlocks | None = None,
    ) -> torch.Tensor:
        if request.step >= self.answered and not self._released.is_set():
            self.held += 1
            self._released.wait()
        return span.forward(hidden, cache, between)


# --------------------------------------------------------------------------- by name


def _seed(options: AdversaryOptions) -> int:
    return 0 if options.seed is None else options.seed


def _wrong_model(options: AdversaryOptions) -> Behaviour:
    if options.wrong_model is None:
        raise InvalidInput("--adversary wrong-model needs --wrong-model DIR (another checkpoint)")
    return WrongModel(options.wrong_model)


def _selective(options: AdversaryOptions) -> Behaviour:
    if options.cheat_fraction is None and options.target_client is None:
        raise InvalidInput("--adversary selective needs --cheat-fraction and/or --target-client")
    inner_name = options.cheat_with or Noise.name
    if inner_name in (Selective.name, Behaviour.name):
        raise InvalidInput(f"--cheat-with must be another adversary, not {inner_name!r}")
    inner = _build(inner_name, options)
    fraction = 1.0 if options.cheat_fraction is None else options.cheat_fraction
    return Selective(inner, fraction, options.target_client, _seed(options))


ADVERSARIES: dict[str, Callable[[AdversaryOptions], Behaviour]] = {
    WrongKey.name: lambda options: WrongKey(),
    BadDigest.name: lambda options: BadDigest(seed=_seed(options)),
    Noise.name: lambda options: Noise(options.perturbation, _seed(options)),
    Subtle.name: lambda options: Subtle(options.perturbation, _seed(options)),
    Lazy.name: lambda options: Lazy(),
    WrongModel.name: _wrong_model,
    WrongQuant.name: lambda options: WrongQuant(options.wrong_quant or "nf4"),
    Selective.name: _selective,
    Hang.name: lambda options: Hang(),
    ColludingNode.name: lambda options: colluding_node(_seed(options), options.perturbation),
    ColludingVerifier.name: lambda options: colluding_verifier(options.accomplice),
    LyingVerifier.name: lambda options: lying_verifier(options.target_node),
    Steering.name: lambda options: steering(options.steer_model, options.steer_token),
}
"""Every strategy by name: a factory taking the options."""

_USES: dict[str, set[str]] = {
    BadDigest.name: {"seed"},
    Noise.name: {"perturbation", "seed"},
    Subtle.name: {"perturbation", "seed"},
    WrongModel.name: {"wrong_model"},
    WrongQuant.name: {"wrong_quant"},
    Selective.name: {"cheat_with", "cheat_fraction", "target_client", "seed"},
    ColludingNode.name: {"perturbation", "seed"},
    ColludingVerifier.name: {"accomplice"},
    LyingVerifier.name: {"target_node"},
    Steering.name: {"steer_token", "steer_model"},
}
"""Options each strategy reads (a selective one also reads those of its ``cheat_with``)."""


def _build(name: str, options: AdversaryOptions) -> Behaviour:
    factory = ADVERSARIES.get(name)
    if factory is None:
        choices = ", ".join([Behaviour.name, *ADVERSARIES])
        raise InvalidInput(f"unknown adversary {name!r}; choose one of: {choices}")
    return factory(options)


def make_behaviour(name: str, options: AdversaryOptions | None = None) -> Behaviour:
    """The behaviour called ``name`` (``honest`` gives the honest one), set up by ``options``.

    Raises :class:`InvalidInput` for an unknown name, a missing required option, or an option
    the chosen strategy does not read (so a typo never silently runs another experiment).
    """
    options = options or AdversaryOptions()
    behaviour = Behaviour() if name == Behaviour.name else _build(name, options)
    used = set(_USES.get(name, set()))
    if name == Selective.name:
        used |= _USES.get(options.cheat_with or Noise.name, set())
    given = {field.name for field in fields(options) if getattr(options, field.name) is not None}
    unused = sorted(given - used)
    if unused:
        flags = ", ".join("--" + option.replace("_", "-") for option in unused)
        raise InvalidInput(f"{flags} does not apply to --adversary {name}")
    return behaviour
