"""A session's book of checks: what runs, what each node-session has verified, what to drop.

The session tells the book about every node-session it opens, every step, every draw and every
rewind; the book schedules checks (:class:`~corolla.client.spotcheck.SpotChecker`), runs the
head rule on passed ones (:mod:`corolla.client.head_rule`), hands failed ones to the ledger
(:mod:`corolla.client.disputes`), and applies rulings:

- a passed check verifies the node's steps ``[0, k)`` (a verifier the referee later convicts
  verifies nothing: its passes are withdrawn);
- a failed check waits for the ruling; a failed head rule stops using the node and the verifier
  at once and asks for a rewind, then waits for the ruling;
- ``node-lied`` bans the node (and any convicted verifier) and asks for a rewind;
  ``verifier-lied`` bans the convicted verifiers and counts the node's steps as checked;
  ``unjudged`` bans nobody, stops using both for this session and asks for a rewind.

A rewind drops every token that depends on a step of the node that is not verified: a token
depends on every step run, in its generation (between two rewinds), before it was drawn. What
no check covers when the session ends is reported as unverified ranges of tokens, with why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from corolla.client.bans import BanList
from corolla.client.check_streams import CheckStreams
from corolla.client.disputes import DisputeCase, build_dispute, judge
from corolla.client.generation import Draw, TokenRange
from corolla.client.head_rule import Logits, head_rule
from corolla.client.node_work import NodeWork
from corolla.client.session_log import SessionLog
from corolla.client.spotcheck import CheckOutcome, SpotChecker
from corolla.client.verifier_choice import profile_of_record
from corolla.node.protocol.records import ServerRecord, peer_id_of
from corolla.verify.disputes import CheckRecord
from corolla.verify.identity import peer_name_of

__all__ = ["CheckBook"]

_SETTLE_GRACE_S = 120.0
"""Beyond the verifiers' timeouts, what the end of a session waits for beacons and rulings."""


@dataclass(eq=False)
class _Held:
    """What the book holds on one node-session."""

    records: list[CheckRecord] = field(default_factory=list)
    passes: list[tuple[bytes, int]] = field(default_factory=list)
    """(verifier key, steps its passed check covers)."""


class CheckBook:
    """The checks of one session (see the module doc)."""

    def __init__(
        self,
        checker: SpotChecker | None,
        streams: CheckStreams | None,
        logits: Logits | None,
        log: SessionLog,
        bans: BanList,
        num_blocks: int,
    ) -> None:
        self.checker = checker
        self.streams = streams
        self.logits = logits
        self.log = log
        self.bans = bans
        self.num_blocks = num_blocks
        self.avoid: set[str] = set()
        """Peers this session no longer uses (routes and verifiers), without banning them."""
        self.generation = 0
        self._works: list[NodeWork] = []
        self._held: dict[NodeWork, _Held] = {}
        self._tokens: list[list[tuple[NodeWork, int]]] = []
        """Per generated token: (node-session, its steps run before the draw)."""
        self._tasks: set[asyncio.Task[CheckOutcome | DisputeCase]] = set()
        self._rewind: set[NodeWork] = set()
        self._convicted: set[bytes] = set()

    # ------------------------------------------------------------------ told by the session

    def opened(self, work: NodeWork) -> None:
        self._works.append(work)
        self._held[work] = _Held()

    def stepped(self, work: NodeWork) -> None:
        """``work`` ran a step: check it with the checker's probability."""
        if self.checker is not None and self.checker.wants_check():
            self._schedule(work, work.steps)

    def drew(self, draw: Draw, work: NodeWork | None, step: int) -> None:
        """Tokens were drawn from ``work``'s output of ``step`` (the route's last node)."""
        if work is not None:
            work.draws[step] = draw
        live = [w for w in self._works if w.generation == self.generation and w.steps]
        self._tokens.append([(w, w.steps) for w in live])

    def rewound(self, kept_tokens: int) -> None:
        """Tokens from ``kept_tokens`` on were dropped; new node-sessions follow."""
        del self._tokens[kept_tokens:]
        self.generation += 1

    def first_tainted(self, work: NodeWork) -> int | None:
        """The first generated token that depends on an unverified step of ``work``."""
        for index, deps in enumerate(self._tokens):
            if any(w is work and steps > work.verified for w, steps in deps):
                return index
        return None

    # ------------------------------------------------------------------ settling

    async def settle(self, *, wait: bool) -> list[NodeWork]:
        """Apply what finished (everything, if ``wait``: the checks every node is owed at the
        end included); the node-sessions whose unverified outputs must be dropped."""
        if wait:
            self._owed_checks()
            deadline = time.monotonic() + self._wait_limit()
            while self._tasks:
                left = deadline - time.monotonic()
                done, _ = await asyncio.wait(set(self._tasks), timeout=max(left, 0))
                if not done:
                    self._give_up()
                    break
                self._apply(done)
                self._owed_checks()  # a ruling may have left steps that need a check again
        else:
            self._apply({task for task in self._tasks if task.done()})
        rewind, self._rewind = [w for w in self._rewind if self.first_tainted(w) is not None], set()
        return rewind

    def unverified(self) -> tuple[TokenRange, ...]:
        """Generated tokens that depend on a step no check covered, grouped, with why."""
        ranges: list[TokenRange] = []
        for index, deps in enumerate(self._tokens):
            reasons = [self._why(w) for w, steps in deps if steps > w.verified]
            if not reasons:
                continue
            reason = reasons[0]
            last = ranges[-1] if ranges else None
            if last is not None and last.end == index and last.reason == reason:
                ranges[-1] = TokenRange(last.start, index + 1, reason)
            else:
                ranges.append(TokenRange(index, index + 1, reason))
        return tuple(ranges)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        if self.streams is not None:
            await self.streams.close()

    # ------------------------------------------------------------------ internals

    def _schedule(self, work: NodeWork, upto: int) -> None:
        if (
            self.checker is None
            or self.streams is None
            or upto <= work.scheduled
            or work.disputed
            or work.peer_id in self.avoid
        ):
            return
        if work.in_flight:
            work.wanted = max(work.wanted, upto)
            return
        work.scheduled, work.in_flight = upto, True
        avoid = frozenset(self.avoid)
        self._spawn(self.checker.check(work, upto, self.streams, avoid))

    def _owed_checks(self) -> None:
        """Every node-session is checked at least once, over every step a kept token needs."""
        if self.checker is None or not self.checker.config.at_least_once:
            return
        needed: dict[NodeWork, int] = {}
        for deps in self._tokens:
            for work, steps in deps:
                needed[work] = max(needed.get(work, 0), steps)
        for work, steps in needed.items():
            if work.verified < steps:
                self._schedule(work, steps)

    def _spawn(self, coroutine: Coroutine[Any, Any, CheckOutcome | DisputeCase]) -> None:
        self._tasks.add(asyncio.ensure_future(coroutine))

    def _apply(self, done: set[asyncio.Task[CheckOutcome | DisputeCase]]) -> None:
        for task in sorted(done, key=id):
            self._tasks.discard(task)
            if task.cancelled():
                continue
            result = task.result()
            if isinstance(result, CheckOutcome):
                self._checked(result)
            else:
                self._ruled(result)

    def _checked(self, outcome: CheckOutcome) -> None:
        self.log.add_check(outcome)
        work = outcome.work
        work.in_flight = False
        self._judge_check(outcome)
        if work.wanted > work.scheduled:
            self._schedule(work, work.wanted)

    def _judge_check(self, outcome: CheckOutcome) -> None:
        work = outcome.work
        held = self._held[work]
        held.records.extend(outcome.records)
        if outcome.verdict == "unchecked":
            if work.verified < outcome.steps:
                work.why_unverified = outcome.note
            return
        verifier = outcome.verifier
        if work.disputed or verifier is None or verifier.public_key in self._convicted:
            return
        if outcome.verdict == "failed":
            failed = next(r for r in outcome.records if not r.verdict.passed)
            self._dispute(work, failed.verdict.end_step, verifier, failed, "the verifier failed it")
            return
        steered = self._head_rule(outcome)
        if steered is not None:
            self.avoid.update((work.peer_id, verifier.peer_id))
            self._rewind.add(work)
            self._dispute(work, outcome.steps, verifier, outcome.records[-1], steered)
            return
        held.passes.append((verifier.public_key, outcome.steps))
        work.verified = max(work.verified, outcome.steps)

    def _head_rule(self, outcome: CheckOutcome) -> str | None:
        work = outcome.work
        if self.logits is None or self.checker is None or work.hop.end != self.num_blocks:
            return None
        profile = profile_of_record(work.hop.record) or ""
        floor = self.checker.rules.honest_floor(profile)
        return head_rule(work, outcome.records, self.logits, floor)

    def _dispute(
        self, work: NodeWork, steps: int, verifier: ServerRecord, trigger: CheckRecord, why: str
    ) -> None:
        work.disputed = True
        profile = profile_of_record(work.hop.record) or ""
        dispute = build_dispute(work, steps, profile, trigger, self._held[work].records)
        ledger = self.checker.ledger if self.checker is not None else None

        async def decide() -> DisputeCase:
            ruling = await judge(ledger, dispute)
            return DisputeCase(work, steps, verifier, why, dispute, ruling)

        self._spawn(decide())

    def _ruled(self, case: DisputeCase) -> None:
        self.log.add_dispute(case)
        work, ruling = case.work, case.ruling
        if ruling.decision == "unjudged":
            self.avoid.update((work.peer_id, case.verifier.peer_id))
            work.why_unverified = f"disputed, not judged: {ruling.reason}"
            self._rewind.add(work)
            return
        for key in ruling.lying_verifiers:
            self._convict(key, ruling.reason)
        if case.verifier.public_key not in ruling.lying_verifiers:
            self.avoid.discard(case.verifier.peer_id)
        if ruling.node_lied:
            self.bans.ban(work.peer_id, f"convicted by the ledger's referee: {ruling.reason}")
            if self.checker is not None:
                self.checker.choice.distrust(work.node_key)
            work.why_unverified = f"the referee convicted the node: {ruling.reason}"
            self._rewind.add(work)
            return
        # The referee found the node's claims [0, steps) honest: they count as checked.
        work.disputed = False
        self.avoid.discard(work.peer_id)
        self._held[work].passes.append((b"", case.steps))
        work.verified = max(work.verified, case.steps)
        if work.wanted > work.scheduled:
            self._schedule(work, work.wanted)

    def _convict(self, key: bytes, reason: str) -> None:
        """A verifier the referee convicted: banned, and none of its passes verify anything."""
        if key in self._convicted:
            return
        self._convicted.add(key)
        if self.checker is not None:
            self.checker.choice.distrust(key)
        self.bans.ban(peer_id_of(key).to_base58(), f"convicted by the ledger's referee: {reason}")
        name = peer_name_of(key)
        for work in self._works:
            held = self._held[work]
            before = work.verified
            held.passes = [(who, steps) for who, steps in held.passes if who != key]
            work.verified = max((steps for _, steps in held.passes), default=0)
            if work.verified < before:
                work.scheduled = work.verified  # owed a check again
                work.why_unverified = f"its verifier {name} was convicted of lying"

    def _give_up(self) -> None:
        """The end of the session came before some checks or rulings: they are abandoned."""
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        for work in self._works:
            if work.disputed:
                self.avoid.add(work.peer_id)
                work.why_unverified = "disputed; the ledger did not rule before the session ended"
                self._rewind.add(work)
            elif work.verified < work.scheduled and not work.why_unverified:
                work.why_unverified = "its check did not finish before the session ended"

    def _wait_limit(self) -> float:
        timeout = self.checker.config.timeout if self.checker is not None else 0.0
        return 4 * timeout + _SETTLE_GRACE_S

    def _why(self, work: NodeWork) -> str:
        if self.checker is None:
            return "spot-checks are off"
        if work.why_unverified:
            return work.why_unverified
        if work.disputed:
            return "disputed; the ledger has not ruled yet"
        return "not checked before the session ended"
