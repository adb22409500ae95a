"""The head rule: where a node's span ends at the model's last block, its outputs are tokens.

A node that ends the route can steer the text while staying under the threshold: it nudges each
output towards a token of its choice, by less than the tolerance. The client holds what it
needs to see that: the verifier's signed recomputation of the node's steps, and, for every step
whose last output position gave the user a token, how that token was drawn
(:class:`~corolla.client.generation.Draw`: greedy, or the sampler's state before the draw).

For each such position the client computes the token the recomputation gives (the client's
final norm and LM head, then the same draw); if it is another token than the one the user got
and the position's score (the per-token relative error between the node's output and the
recomputation, :func:`~corolla.verify.tolerance.token_errors`) is above the model's honest
floor, the check fails: the session rewinds to the node's verified output at once and hands the
claims and the verdicts to the ledger's referee, which applies the same rule with its own head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from corolla.client.node_work import NodeWork
from corolla.verify.disputes import CheckRecord
from corolla.verify.tolerance import token_errors

__all__ = ["Logits", "head_rule"]

Logits = Callable[[torch.Tensor], torch.Tensor]
"""hidden [batch, tokens, hidden] -> logits [batch, tokens, vocab] (the client's head)."""


def head_rule(
    work: NodeWork, records: Sequence[CheckRecord], logits: Logits, floor: float
) -> str | None:
    """Why the head rule fails for ``work``'s steps covered by ``records`` (None: it holds)."""
    batch = work.claims[0].input.shape[0]
    steered: list[str] = []
    for record in records:
        verdict = record.verdict
        first_position = verdict.first_position // batch  # per sequence
        for step in range(verdict.first_step, verdict.end_step):
            draw = work.draws.get(step)
            if draw is None:
                continue  # no token was drawn from this step's output
            claim = work.claims[step]
            last = work.starts[step] + claim.input.shape[1] - 1  # per-sequence position
            mine = claim.output[:, -1:, :]  # batch, 1, hidden
            theirs = record.output[:, last - first_position : last - first_position + 1, :]
            again = draw.again(logits(theirs)[:, -1, :])  # batch
            scores = token_errors(mine, theirs)[:, 0]  # batch
            for row in range(batch):
                if bool(draw.done[row]) or int(again[row]) == int(draw.tokens[row]):
                    continue
                if float(scores[row]) > floor:
                    steered.append(
                        f"position {last} (sequence {row}): the recomputation gives token "
                        f"{int(again[row])}, the user got {int(draw.tokens[row])}, score "
                        f"{float(scores[row]):.3g}"
                    )
    if not steered:
        return None
    return (
        f"the head rule fails above the honest floor {floor:.3g} at "
        f"{len(steered)} position(s): {'; '.join(steered[:3])}"
    )
