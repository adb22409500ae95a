"""Adversaries of checks v2 (issue 13): verifiers that lie, and nodes that count on them or on
the tolerance. Each is a :class:`~corolla.node.behaviour.Behaviour`; a verifier's lie goes
through ``judge`` (the verdict it signs), a node's through ``output`` (what its receipt names).

- ``colluding-node``      one half of a colluding pair (one operator, two identities): corrupts
                          its outputs deterministically with noise of ``perturbation`` (default
                          1e-2) x each token's RMS, drawn from the pair's shared ``seed``;
- ``colluding-verifier``  the other half: signs *passed*, with a fake small score (a fiftieth of
                          its threshold), whenever the checked node is its ``accomplice`` (a
                          public key it knows from its configuration); judges honestly otherwise;
- ``lying-verifier``      signs *failed*, with a score of 30x its threshold, against every node
                          it checks, or only against ``target_node``; its recomputation stays
                          honest, so its verdict contradicts its own signed numbers;
- ``steering``            a node serving the model's last block that pushes each output position
                          by ``share`` (0.9) x the threshold x the token's norm towards a chosen
                          token (``token``; default: each position's runner-up), in the direction
                          the model's public final norm and LM head say raises that token's logit
                          against the greedy one. Its score stays under the threshold.

The factories at the end build them from ``corolla simulate node`` options.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from corolla.errors import InvalidInput
from corolla.node.behaviour import Behaviour
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.families import Head
from corolla.node.model.head import read_head
from corolla.node.model.manifest import load_manifest
from corolla.node.model.span import Span
from corolla.node.verifier import read_calibrations
from corolla.verify.encoding import domain_digest
from corolla.verify.identity import PUBLIC_KEY_SIZE, Identity, peer_name_of
from corolla.verify.receipts import StepRequest
from corolla.verify.tolerance import profile_of, tolerance_for
from corolla.verify.verdicts import CheckVerdict, parse_score, sign_verdict

__all__ = [
    "ColludingNode",
    "ColludingVerifier",
    "LyingVerifier",
    "Steering",
    "colluding_node",
    "colluding_verifier",
    "lying_verifier",
    "steer",
    "steering",
]


class ColludingNode(Behaviour):
    """Corrupts every output with noise from the pair's shared seed (its accomplice verifies).

    hidden [batch, tokens, hidden]: token (b, t) gets ``randn(hidden) * p * rms(honest[b, t])``
    with the noise drawn from (seed, session, step), so a retried step is answered the same and
    each cheated token scores about ``p``."""

    name = "colluding-node"

    def __init__(self, perturbation: float | None = None, seed: int = 0) -> None:
        size = 1e-2 if perturbation is None else perturbation
        if not 0 < size < 1e6:
            raise InvalidInput(f"--perturbation must be a positive size, not {size!r}")
        self.perturbation = size
        self.seed = seed

    def describe(self) -> str:
        return (
            f"{self.name} (noise of {self.perturbation:g} x each token's RMS from the pair's "
            f"seed {self.seed}; counts on its accomplice verifier)"
        )

    def output(
        self, step: int, request: StepRequest, hidden_in: torch.Tensor, honest: torch.Tensor
    ) -> torch.Tensor:
        draw = domain_digest("colluding-node", self.seed, request.session_id, request.step)
        generator = torch.Generator().manual_seed(int.from_bytes(draw[:8], "big") >> 1)
        noise = torch.randn(honest.shape, generator=generator, dtype=torch.float32)
        rms = honest.float().pow(2).mean(dim=-1, keepdim=True).sqrt()  # batch, tokens, 1
        return honest + (noise * rms * self.perturbation).to(honest.dtype)


class ColludingVerifier(Behaviour):
    """Signs *passed* with a fake small score over its ``accomplice``'s work; honest otherwise."""

    name = "colluding-verifier"
    fake_share = 1 / 50
    """The fake score, as a share of the verifier's threshold."""

    def __init__(self, accomplice: bytes) -> None:
        self.accomplice = _key("accomplice", accomplice)

    def describe(self) -> str:
        return f"{self.name} (passes every check of {peer_name_of(self.accomplice)})"

    def judge(self, identity: Identity, verdict: CheckVerdict) -> CheckVerdict:
        if verdict.node_key == self.accomplice:
            fake = parse_score(verdict.threshold, "threshold") * self.fake_share
            verdict = dataclasses.replace(verdict, passed=True, score=repr(fake))
        return sign_verdict(identity, verdict)


class LyingVerifier(Behaviour):
    """Signs *failed* against every node it checks (or only against ``target``)."""

    name = "lying-verifier"
    fake_ratio = 30.0
    """The fake score, as a multiple of the verifier's threshold."""

    def __init__(self, target: bytes | None = None) -> None:
        self.target = None if target is None else _key("target node", target)

    def describe(self) -> str:
        whom = "every node" if self.target is None else peer_name_of(self.target)
        return f"{self.name} (fails every check of {whom})"

    def judge(self, identity: Identity, verdict: CheckVerdict) -> CheckVerdict:
        if self.target is None or verdict.node_key == self.target:
            fake = parse_score(verdict.threshold, "threshold") * self.fake_ratio
            verdict = dataclasses.replace(verdict, passed=False, score=repr(fake))
        return sign_verdict(identity, verdict)


class Steering(Behaviour):
    """A last-span node that steers the text under the threshold (see :func:`steer`)."""

    name = "steering"

    def __init__(
        self,
        model: Path,
        token: int | None = None,
        share: float = 0.9,
        threshold: float | None = None,
    ) -> None:
        if not 0 < share < 1:
            raise InvalidInput(f"a steering node stays under the threshold: share {share!r}")
        if token is not None and (isinstance(token, bool) or token < 0):
            raise InvalidInput(f"--steer-token must be a token id, not {token!r}")
        self.model = Path(model)
        self.token = token
        self.share = share
        self.threshold = threshold
        self.head: Head | None = None
        self.size = 0.0
        self.last_block = 0

    def describe(self) -> str:
        towards = "each position's runner-up" if self.token is None else f"token {self.token}"
        return (
            f"{self.name} (pushes each output {self.share:g} x the threshold x its norm towards "
            f"{towards}, at the model's last block)"
        )

    def attach(self, span: Span) -> None:
        checkpoint = Checkpoint(self.model)
        manifest = load_manifest(checkpoint)
        if manifest.model_digest != span.model_digest:
            raise InvalidInput(f"the steering head {self.model} is not the node's model")
        if span.end != checkpoint.num_blocks:
            raise InvalidInput(
                f"a steering node serves the model's last block ({checkpoint.num_blocks - 1}); "
                f"this one ends at {span.end}"
            )
        head = read_head(checkpoint, manifest).requires_grad_(False)
        if self.token is not None and self.token >= head.lm_head.out_features:
            raise InvalidInput(f"token {self.token} is outside the model's vocabulary")
        threshold = self.threshold
        if threshold is None:
            profile = profile_of(str(span.dtype), span.quant)
            calibration = read_calibrations(checkpoint.directory, span.model_digest).get(profile)
            threshold = (
                calibration.threshold
                if calibration is not None
                else tolerance_for(profile).threshold
            )
        self.head, self.size, self.last_block = head, self.share * threshold, checkpoint.num_blocks

    def output(
        self, step: int, request: StepRequest, hidden_in: torch.Tensor, honest: torch.Tensor
    ) -> torch.Tensor:
        if self.head is None or request.end != self.last_block:
            return honest
        return steer(honest, self.head, self.size, self.token)


def steer(hidden: torch.Tensor, head: Head, size: float, token: int | None = None) -> torch.Tensor:
    """``hidden`` [batch, tokens, hidden] with each position moved by ``size`` x its norm along
    the gradient of (target logit - greedy logit); positions whose greedy token already is the
    target are left alone. The per-token relative error is at most ``size``."""
    base = hidden.detach().clone()  # a normal tensor, even from an inference-mode forward
    with torch.enable_grad():
        probe = base.clone().requires_grad_(True)
        logits = head.logits(probe)  # batch, tokens, vocab
        best = logits.topk(2, dim=-1).indices  # batch, tokens, 2
        greedy = best[..., 0]
        target = best[..., 1] if token is None else torch.full_like(greedy, token)
        gain = logits.gather(-1, target[..., None]) - logits.gather(-1, greedy[..., None])
        (gradient,) = torch.autograd.grad(gain.sum(), probe)
    norm = gradient.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    push = gradient / norm * base.norm(dim=-1, keepdim=True) * size
    return torch.where((target != greedy)[..., None], base + push, base)


# --------------------------------------------------------------------------- by options


def colluding_node(seed: int, perturbation: float | None = None) -> ColludingNode:
    """``--adversary colluding-node [--seed SHARED] [--perturbation P]``."""
    return ColludingNode(perturbation, seed)


def colluding_verifier(accomplice: str | None) -> ColludingVerifier:
    """``--adversary colluding-verifier --accomplice HEX`` (the accomplice node's public key)."""
    if accomplice is None:
        raise InvalidInput("--adversary colluding-verifier needs --accomplice (a node's key, hex)")
    return ColludingVerifier(_hex_key("--accomplice", accomplice))


def lying_verifier(target_node: str | None = None) -> LyingVerifier:
    """``--adversary lying-verifier [--target-node HEX]``."""
    return LyingVerifier(None if target_node is None else _hex_key("--target-node", target_node))


def steering(model: Path | None, token: int | None = None) -> Steering:
    """``--adversary steering [--steer-token ID]``; ``model`` is the node's own checkpoint."""
    if model is None:
        raise InvalidInput("--adversary steering needs the model's checkpoint for its head")
    return Steering(model, token)


def _hex_key(option: str, text: str) -> bytes:
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise InvalidInput(f"{option} must be a public key in hex") from None
    return _key(option, key)


def _key(name: str, key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != PUBLIC_KEY_SIZE:
        raise InvalidInput(f"the {name} is a {PUBLIC_KEY_SIZE}-byte public key")
    return key
