"""The ledger's HTTP client, for nodes, clients, the auditor and the command line.

:class:`AsyncLedgerClient` does the work (httpx, timeouts, bounded retries); :class:`LedgerClient`
is its thin synchronous face. Writes are signed with the caller's identity. Reads are retried on
transport errors and 5xx; a write is retried only when it cannot have reached the ledger
(connection refused or timed out while connecting), because a signed write is never replayed.
Errors: :class:`~corolla.errors.LedgerRefused` for a 4xx (with the ledger's message and status),
:class:`~corolla.errors.LedgerError` when the ledger is unreachable or fails.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from corolla.errors import InvalidInput, LedgerError, LedgerRefused
from corolla.ledger.api.checks import (
    DisputeOutcome,
    Serving,
    calibration_from_wire,
    calibration_to_wire,
)
from corolla.ledger.api.envelope import sign_envelope
from corolla.ledger.api.models import Account, Entry, Operation, b64encode, from_hex
from corolla.ledger.api.reports import Attestation, report_batches, report_body
from corolla.verify.beacon import Beacon, verify_beacon
from corolla.verify.checkpoints import Checkpoint, verify_checkpoint
from corolla.verify.encoding import canonical
from corolla.verify.identity import Identity
from corolla.verify.receipts import Receipt, StepRequest
from corolla.verify.tickets import Ticket, verify_ticket

if TYPE_CHECKING:
    from corolla.verify.disputes import Dispute
    from corolla.verify.evidence import FraudEvidence
    from corolla.verify.tolerance import Calibration

__all__ = [
    "AsyncLedgerClient",
    "ClientConfig",
    "DisputeOutcome",
    "EntryPage",
    "EvidenceVerdict",
    "LedgerClient",
]

_T = TypeVar("_T")
Pairs = Sequence[tuple[StepRequest, Receipt]]


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Timeouts and retries of the ledger client."""

    timeout_s: float = 15.0
    attempts: int = 3
    backoff_s: float = 0.2
    batch_pairs: int = 500
    """Submissions of more pairs are split into signed batches of about this size (a report
    keeps each node-session's pairs, and the attestations that check them, together)."""
    evidence_timeout_s: float = 300.0
    """Fraud evidence is large and the ledger may recompute it: a longer timeout."""


@dataclass(frozen=True, slots=True)
class EvidenceVerdict:
    """The ledger's answer to fraud evidence (a refusal raises ``LedgerRefused`` instead)."""

    verdict: str
    """``guilty`` (the accused was slashed) or ``unjudged`` (logged; convicts nobody)."""
    judge: str
    """``referee``, ``verifiers`` or ``none``."""
    reason: str
    accused: bytes
    evidence_digest: bytes
    taken: int
    """Points the slash took from the accused."""
    entries: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class EntryPage:
    """A page of the log: entries, the ledger's leaf hashes for them, their operations."""

    entries: list[Entry]
    leaf_hashes: dict[int, bytes]
    operations: dict[int, Operation]


class AsyncLedgerClient:
    """Talks to one ledger. Use as an async context manager, or call :meth:`aclose`."""

    def __init__(
        self,
        url: str,
        identity: Identity | None = None,
        config: ClientConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        ledger_key: bytes | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.identity = identity
        self.config = config or ClientConfig()
        self.ledger_key = ledger_key
        """The ledger's key beacons are checked against (learnt from ``/v1/info`` on first use
        when not given)."""
        self._origin: str | None = None
        self._http = httpx.AsyncClient(
            base_url=self.url, timeout=self.config.timeout_s, transport=transport
        )

    async def __aenter__(self) -> AsyncLedgerClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # Writes (signed).

    async def register(self, name: str) -> dict[str, Any]:
        """Register the client's key as an account called ``name``."""
        return await self._signed("/v1/accounts", "register", {"name": name})

    async def submit_report(
        self, pairs: Pairs, attestations: Sequence[Attestation]
    ) -> list[dict[str, Any]]:
        """Report sessions' (request, receipt) pairs and the verifiers' signed verdicts on them
        (the client's identity must be the client of all of them). Work earns its nodes points
        only where a passed verdict by its assigned verifier covers it; each verdict pays its
        verifier for the positions it newly checked. An attestation that does not count (not
        the assigned verifier, a verdict inconsistent with its score, a beacon that is not the
        ledger's...) refuses its batch with :class:`LedgerRefused` naming it. Returns each
        batch's result: per pair the credited units (or why none), per attestation its fee."""
        if not pairs:
            raise InvalidInput("no pairs to report")
        return [
            await self._signed("/v1/reports", "report", report_body(batch, checks))
            for batch, checks in report_batches(pairs, attestations, self.config.batch_pairs)
        ]

    async def buy_ticket(self, budget: int, ttl_s: int) -> Ticket:
        """Spend points on a ticket of ``budget`` block-tokens; returns the signed ticket."""
        result = await self._signed("/v1/tickets", "buy-ticket", {"budget": budget, "ttl_s": ttl_s})
        ticket = Ticket.from_dict(result["ticket"])
        verify_ticket(ticket)
        return ticket

    async def redeem(self, pairs: Pairs) -> list[dict[str, Any]]:
        """Redeem ticketed (request, receipt) pairs for payment to their nodes."""
        return [
            await self._signed("/v1/tickets/redeem", "redeem", {"pairs": batch})
            for batch in self._batches(pairs)
        ]

    async def submit_evidence(self, evidence: FraudEvidence) -> EvidenceVerdict:
        """Submit fraud evidence; the ledger checks and judges it. Returns its verdict
        (``guilty``: the accused was slashed; ``unjudged``: logged, convicts nobody); raises
        :class:`LedgerRefused` with the reason for evidence that is forged, tampered, or
        accuses an honest node."""
        body = {"evidence": b64encode(evidence.to_bytes())}
        result = await self._signed(
            "/v1/evidence", "evidence", body, timeout=self.config.evidence_timeout_s
        )
        try:
            return EvidenceVerdict(
                verdict=str(result["verdict"]),
                judge=str(result["judge"]),
                reason=str(result["reason"]),
                accused=from_hex(result["accused"]),
                evidence_digest=from_hex(result["evidence_digest"]),
                taken=int(result["taken"]),
                entries=tuple(int(seq) for seq in result["entries"]),
            )
        except (KeyError, TypeError, ValueError, InvalidInput) as error:
            raise LedgerError(f"the ledger sent a malformed verdict: {error}") from None

    async def slash(self, account: bytes, reason: str, evidence: bytes) -> int:
        """Operator only (the client's identity must be the ledger's key): slash ``account``
        on the strength of fraud evidence in the log (its digest); returns the points taken."""
        body = {"account": account.hex(), "reason": reason, "evidence": evidence.hex()}
        return int((await self._signed("/v1/slash", "slash", body))["taken"])

    async def declare_serving(
        self, model_digest: bytes, start: int, end: int, profile: str
    ) -> dict[str, Any]:
        """Declare (as the node whose identity this client holds) that it serves blocks
        ``[start, end)`` of the model under ``profile``: it becomes a candidate verifier of
        checks assigned by the beacons of epochs that begin afterwards."""
        body = Serving(model_digest, start, end, profile).to_body()
        return await self._signed("/v1/serving", "serving", body)

    async def withdraw_serving(
        self, model_digest: bytes, start: int, end: int, profile: str
    ) -> dict[str, Any]:
        """Withdraw a declaration made with :meth:`declare_serving`."""
        body = Serving(model_digest, start, end, profile).to_body()
        return await self._signed("/v1/serving/withdraw", "serving-withdraw", body)

    async def publish_calibrations(self, calibrations: Sequence[Calibration]) -> dict[str, Any]:
        """Operator only (the identity must be the ledger's key): publish calibrations; verdicts
        on their models are then held to their thresholds."""
        if not calibrations:
            raise InvalidInput("no calibrations to publish")
        body = {"calibrations": [calibration_to_wire(c) for c in calibrations]}
        return await self._signed("/v1/calibrations", "calibrate", body)

    async def submit_dispute(self, dispute: Dispute) -> DisputeOutcome:
        """Submit a dispute (the client's identity must be the client of its claims). The
        ledger's referee decides it, slashing every side that lied; without a referee it is
        logged unjudged and slashes nobody. Raises :class:`LedgerRefused` with the reason for a
        dispute that is malformed, inconsistent or already logged."""
        body = {"dispute": b64encode(dispute.to_bytes())}
        result = await self._signed(
            "/v1/disputes", "dispute", body, timeout=self.config.evidence_timeout_s
        )
        try:
            return DisputeOutcome.from_answer(result)
        except InvalidInput as error:
            raise LedgerError(f"the ledger sent {error}") from None

    # Reads.

    async def beacon(self, epoch: int | None = None) -> Beacon:
        """The ledger's beacon of ``epoch`` (default: the current one), its signature checked
        against the ledger's key; :class:`LedgerRefused` (425) for an epoch not begun."""
        path = "/v1/beacon" if epoch is None else f"/v1/beacon/{int(epoch)}"
        data = await self._get(path)
        key, origin = await self._ledger_identity()
        try:
            beacon = Beacon.from_dict(data)
        except InvalidInput as error:
            raise LedgerError(f"the ledger sent a malformed beacon: {error}") from None
        verify_beacon(beacon, key, origin)
        if epoch is not None and beacon.epoch != epoch:
            raise LedgerError(f"the ledger sent the beacon of epoch {beacon.epoch}, not {epoch}")
        return beacon

    async def servers(
        self, model_digest: bytes, start: int, end: int, profile: str, before_epoch: int
    ) -> list[bytes]:
        """Keys of the nodes whose serving declarations cover blocks ``[start, end)`` of the
        model under ``profile``, as they stood when ``before_epoch`` began (the candidates of
        the checks that epoch's beacon assigns)."""
        wanted = Serving(model_digest, start, end, profile)
        params = {**wanted.to_body(), "before": before_epoch}
        data = await self._get("/v1/serving", params)
        try:
            return [from_hex(key) for key in data["servers"]]
        except (KeyError, TypeError, InvalidInput) as error:
            raise LedgerError(f"the ledger sent a malformed list of servers: {error}") from None

    async def calibrations(self, model_digest: bytes) -> dict[str, Calibration]:
        """The latest calibration the ledger published for each profile of the model."""
        data = await self._get(f"/v1/calibrations/{model_digest.hex()}")
        try:
            found = [calibration_from_wire(item["calibration"]) for item in data["calibrations"]]
        except (KeyError, TypeError, InvalidInput) as error:
            raise LedgerError(f"the ledger sent malformed calibrations: {error}") from None
        return {c.profile: c for c in found if c.model_digest == model_digest}

    async def _ledger_identity(self) -> tuple[bytes, str | None]:
        if self.ledger_key is not None and self._origin is not None:
            return self.ledger_key, self._origin
        info = await self.info()
        try:
            served, origin = from_hex(info["ledger_key"]), str(info["origin"])
        except (KeyError, TypeError, InvalidInput) as error:
            raise LedgerError(f"the ledger sent malformed info: {error}") from None
        if self.ledger_key is None:
            self.ledger_key = served
        self._origin = origin
        return self.ledger_key, origin

    async def info(self) -> dict[str, Any]:
        """The ledger's origin, key, rules, limits and size."""
        return await self._get("/v1/info")

    async def checkpoint(self, ledger_key: bytes | None = None) -> Checkpoint:
        """The latest signed checkpoint, its signature checked (and its key, when pinned)."""
        checkpoint = Checkpoint.from_dict(await self._get("/v1/checkpoint"))
        verify_checkpoint(checkpoint, ledger_key=ledger_key)
        return checkpoint

    async def account(self, key: bytes) -> Account | None:
        """An account, or None if the ledger has none for ``key``."""
        try:
            data = await self._get(f"/v1/accounts/{key.hex()}")
        except LedgerRefused as error:
            if error.status_code == 404:
                return None
            raise
        return _account(data)

    async def balance(self, key: bytes) -> int:
        """Points held by ``key`` (0 for an unknown account). One small indexed read: cheap
        enough for a node to poll for a live display."""
        account = await self.account(key)
        return 0 if account is None else account.balance

    async def accounts(self, after: bytes = b"", limit: int = 1000) -> list[Account]:
        """A page of all accounts in key order."""
        data = await self._get("/v1/accounts", {"after": after.hex(), "limit": limit})
        return [_account(item) for item in data["accounts"]]

    async def history(self, key: bytes, before: int | None = None, limit: int = 100) -> list[Entry]:
        """The account's entries, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        data = await self._get(f"/v1/accounts/{key.hex()}/history", params)
        return [Entry.from_dict(item) for item in data["entries"]]

    async def top(self, by: str = "balance", limit: int = 10) -> list[Account]:
        """The leaderboard by ``balance`` or ``reputation``."""
        data = await self._get("/v1/top", {"by": by, "limit": limit})
        return [_account(item) for item in data["accounts"]]

    async def raw_entries(self, start: int, limit: int = 1000) -> dict[str, Any]:
        """A page of the log as the ledger sent it (JSON; what auditors parse themselves)."""
        return await self._get("/v1/entries", {"start": start, "limit": limit})

    async def entries(self, start: int, limit: int = 1000) -> EntryPage:
        """A page of the log from sequence number ``start``."""
        data = await self.raw_entries(start, limit)
        try:
            entries = [Entry.from_dict(item) for item in data["entries"]]
            leaves = {item["seq"]: from_hex(item["leaf_hash"]) for item in data["entries"]}
            operations = [Operation.from_dict(item) for item in data["operations"]]
        except (KeyError, TypeError) as error:
            raise LedgerError(f"the ledger sent a malformed page of entries: {error}") from None
        return EntryPage(entries, leaves, {operation.op: operation for operation in operations})

    async def inclusion_proof(self, index: int, size: int) -> tuple[bytes, list[bytes]]:
        """The leaf hash at ``index`` and its audit path in the tree of ``size``."""
        data = await self._get("/v1/proofs/inclusion", {"index": index, "size": size})
        return from_hex(data["leaf_hash"]), [from_hex(item) for item in data["proof"]]

    async def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """Proof that the tree of ``first`` entries is a prefix of the tree of ``second``."""
        data = await self._get("/v1/proofs/consistency", {"first": first, "second": second})
        return [from_hex(item) for item in data["proof"]]

    async def ticket(self, digest: bytes) -> tuple[Ticket, int]:
        """A sold ticket and the block-tokens already redeemed from it."""
        data = await self._get(f"/v1/tickets/{digest.hex()}")
        return Ticket.from_dict(data["ticket"]), int(data["spent"])

    # Plumbing.

    def _batches(self, pairs: Pairs) -> list[list[dict[str, Any]]]:
        if not pairs:
            raise InvalidInput("no pairs to submit")
        items = [{"request": r.to_dict(), "receipt": c.to_dict()} for r, c in pairs]
        size = self.config.batch_pairs
        return [items[i : i + size] for i in range(0, len(items), size)]

    async def _signed(
        self, path: str, action: str, body: Any, timeout: float | None = None
    ) -> dict[str, Any]:
        if self.identity is None:
            raise InvalidInput("this ledger client has no identity to sign requests with")
        data = canonical(body)
        envelope = sign_envelope(self.identity, action, data)
        content = json.dumps(body, separators=(",", ":")).encode()
        headers = {**envelope.to_headers(), "content-type": "application/json"}
        request: dict[str, Any] = {"content": content, "headers": headers}
        if timeout is not None:
            request["timeout"] = timeout
        return await self._send("POST", path, **request)

    async def _get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._send("GET", path, params=params)

    async def _send(self, method: str, path: str, **request: Any) -> dict[str, Any]:
        idempotent = method == "GET"
        for attempt in range(1, self.config.attempts + 1):
            last = attempt == self.config.attempts
            try:
                response = await self._http.request(method, path, **request)
            except (httpx.ConnectError, httpx.ConnectTimeout) as error:
                if last:
                    raise LedgerError(f"ledger at {self.url} is unreachable: {error}") from None
            except httpx.TransportError as error:
                if last or not idempotent:
                    raise LedgerError(f"ledger at {self.url} failed: {error!r}") from None
            else:
                if response.status_code < 400:
                    return _json(response)
                if response.status_code < 500:
                    raise LedgerRefused(_message(response), response.status_code)
                if last or not idempotent:
                    raise LedgerError(f"ledger error {response.status_code}: {_message(response)}")
            await asyncio.sleep(self.config.backoff_s * 2 ** (attempt - 1))
        raise LedgerError("no attempt was made")  # attempts < 1


class LedgerClient:
    """Synchronous face of :class:`AsyncLedgerClient` (same methods, blocking)."""

    def __init__(
        self,
        url: str,
        identity: Identity | None = None,
        config: ClientConfig | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        ledger_key: bytes | None = None,
    ) -> None:
        self._runner = asyncio.Runner()
        self.client = AsyncLedgerClient(url, identity, config, transport, ledger_key)

    def __enter__(self) -> LedgerClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._run(self.client.aclose())
        self._runner.close()

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return self._runner.run(coroutine)

    def register(self, name: str) -> dict[str, Any]:
        return self._run(self.client.register(name))

    def submit_report(
        self, pairs: Pairs, attestations: Sequence[Attestation]
    ) -> list[dict[str, Any]]:
        return self._run(self.client.submit_report(pairs, attestations))

    def buy_ticket(self, budget: int, ttl_s: int) -> Ticket:
        return self._run(self.client.buy_ticket(budget, ttl_s))

    def redeem(self, pairs: Pairs) -> list[dict[str, Any]]:
        return self._run(self.client.redeem(pairs))

    def submit_evidence(self, evidence: FraudEvidence) -> EvidenceVerdict:
        return self._run(self.client.submit_evidence(evidence))

    def slash(self, account: bytes, reason: str, evidence: bytes) -> int:
        return self._run(self.client.slash(account, reason, evidence))

    def declare_serving(
        self, model_digest: bytes, start: int, end: int, profile: str
    ) -> dict[str, Any]:
        return self._run(self.client.declare_serving(model_digest, start, end, profile))

    def withdraw_serving(
        self, model_digest: bytes, start: int, end: int, profile: str
    ) -> dict[str, Any]:
        return self._run(self.client.withdraw_serving(model_digest, start, end, profile))

    def publish_calibrations(self, calibrations: Sequence[Calibration]) -> dict[str, Any]:
        return self._run(self.client.publish_calibrations(calibrations))

    def submit_dispute(self, dispute: Dispute) -> DisputeOutcome:
        return self._run(self.client.submit_dispute(dispute))

    def beacon(self, epoch: int | None = None) -> Beacon:
        return self._run(self.client.beacon(epoch))

    def servers(
        self, model_digest: bytes, start: int, end: int, profile: str, before_epoch: int
    ) -> list[bytes]:
        return self._run(self.client.servers(model_digest, start, end, profile, before_epoch))

    def calibrations(self, model_digest: bytes) -> dict[str, Calibration]:
        return self._run(self.client.calibrations(model_digest))

    def info(self) -> dict[str, Any]:
        return self._run(self.client.info())

    def checkpoint(self, ledger_key: bytes | None = None) -> Checkpoint:
        return self._run(self.client.checkpoint(ledger_key))

    def account(self, key: bytes) -> Account | None:
        return self._run(self.client.account(key))

    def balance(self, key: bytes) -> int:
        return self._run(self.client.balance(key))

    def accounts(self, after: bytes = b"", limit: int = 1000) -> list[Account]:
        return self._run(self.client.accounts(after, limit))

    def history(self, key: bytes, before: int | None = None, limit: int = 100) -> list[Entry]:
        return self._run(self.client.history(key, before, limit))

    def top(self, by: str = "balance", limit: int = 10) -> list[Account]:
        return self._run(self.client.top(by, limit))

    def entries(self, start: int, limit: int = 1000) -> EntryPage:
        return self._run(self.client.entries(start, limit))

    def raw_entries(self, start: int, limit: int = 1000) -> dict[str, Any]:
        return self._run(self.client.raw_entries(start, limit))

    def inclusion_proof(self, index: int, size: int) -> tuple[bytes, list[bytes]]:
        return self._run(self.client.inclusion_proof(index, size))

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        return self._run(self.client.consistency_proof(first, second))

    def ticket(self, digest: bytes) -> tuple[Ticket, int]:
        return self._run(self.client.ticket(digest))


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        raise LedgerError(f"the ledger answered {response.status_code} without JSON") from None
    if not isinstance(data, dict):
        raise LedgerError("the ledger answered with JSON that is not an object")
    return data


def _message(response: httpx.Response) -> str:
    try:
        data = response.json()
        if isinstance(data, dict) and isinstance(data.get("error"), str):
            return data["error"]
    except ValueError:
        pass
    return f"HTTP {response.status_code}: {response.text[:200]}"


def _account(data: Any) -> Account:
    try:
        return Account(
            from_hex(data["account"]),
            str(data["name"]),
            int(data["balance"]),
            int(data["reputation"]),
            bool(data.get("slashed", False)),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise LedgerError(f"the ledger sent a malformed account: {error}") from None
