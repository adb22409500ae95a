"""What `corolla generate` does once its options are checked: load, generate, report.

:func:`run_generation` loads the model (local spans, or the client side and the swarm, with a
priority ticket if asked), generates while a :class:`TokenSink` shows the text, closes the
swarm, then writes the receipts file and reports the session to the ledger if asked. It returns
a :class:`GenerateResult` for the printer; it prints only status lines (on stderr).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from rich.console import Console

from corolla.client.generate_options import GenerateOptions
from corolla.client.generation import Backbone, TokenRange, generate_result
from corolla.client.head import ClientHead, load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.priority import PriorityConfig, TicketWallet, trusted_keys
from corolla.client.remote import RemoteSession
from corolla.client.reporting import report_session
from corolla.client.session_log import SessionLog, WorkRecord
from corolla.errors import RouteUnavailable
from corolla.ledger.api.client import LedgerClient
from corolla.verify.identity import load_or_create_identity

__all__ = ["GenerateResult", "TokenSink", "run_generation", "swarm_summary"]

_status = Console(stderr=True)


class TokenSink(Protocol):
    """Shows the text while it is generated."""

    def begin(self, head: ClientHead, prompt: str) -> None: ...

    def __call__(self, tokens: torch.Tensor) -> None:
        """The new token of each sequence, [batch]."""
        ...

    def rewind(self, kept: int) -> None:
        """Everything after `kept` generated tokens is regenerated."""
        ...


@dataclass(frozen=True)
class GenerateResult:
    head: ClientHead
    input_ids: torch.Tensor  # 1, prompt
    new_ids: torch.Tensor  # new
    load_s: float
    generate_s: float
    swarm: dict[str, object] | None
    """What the swarm did (:func:`swarm_summary`, with the ledger's answer); None if local."""
    unverified: tuple[TokenRange, ...] = ()
    """Generated tokens whose steps no spot-check covered, and why."""

    @property
    def text(self) -> str:
        return self.head.tokenizer.decode(self.new_ids.tolist(), skip_special_tokens=True)


def run_generation(options: GenerateOptions, sink: TokenSink | None) -> GenerateResult:
    started = time.perf_counter()
    remote: DistributedModelForCausalLM | None = None
    with _status.status("loading the model", spinner="dots"):
        if options.local:
            head = load_head(options.model)
            backbone: Backbone = LocalBackbone.load(
                options.model, options.local_splits(head.num_blocks)
            )
        else:
            remote = _join_swarm(options)
            head, backbone = remote.head, remote.backbone
    try:
        loaded = time.perf_counter()
        input_ids = (  # 1, prompt
            head.chat_ids(options.prompt, options.system)
            if options.chat
            else head.tokenizer(options.prompt, return_tensors="pt").input_ids
        )
        if sink is not None:
            sink.begin(head, options.prompt + ("\n" if options.chat else ""))  # answer below
        result = generate_result(
            head,
            backbone,
            input_ids,
            options.generation,
            on_tokens=sink,
            on_rewind=sink.rewind if sink is not None else None,
            require_checks=options.require_checks,
        )
        finished = time.perf_counter()
        session = remote.backbone.last_session if remote is not None else None
    finally:
        if remote is not None:
            remote.close()
    summary = _settle(options, session) if session is not None else None
    return GenerateResult(
        head,
        input_ids,
        result.tokens[0],
        loaded - started,
        finished - loaded,
        summary,
        result.unverified,
    )


def _join_swarm(options: GenerateOptions) -> DistributedModelForCausalLM:
    remote = DistributedModelForCausalLM.from_pretrained(
        options.model, config=options.client, checks=options.checks, ledger=options.ledger
    )
    paid = options.paid
    if paid is not None:
        try:
            _buy_priority(remote, paid, options.identity, options.fallback_free)
        except BaseException:
            remote.close()
            raise
    return remote


def _settle(options: GenerateOptions, session: RemoteSession) -> dict[str, object]:
    """Write the receipts and report to the ledger, as asked; the session's summary."""
    summary = swarm_summary(session)
    if options.ledger is not None:
        summary["ledger"] = _report(options.ledger, options.identity, session.log)
    if options.receipts is not None:
        _write_work(options.receipts, session.log.work)
    return summary


def swarm_summary(session: RemoteSession) -> dict[str, object]:
    """The route, verified receipts, priority, spot-checks, disputes, rewinds and failovers of a
    session, and its unverified tokens."""
    log = session.log
    return {
        "route": [
            {"peer_id": hop.peer_id, "blocks": [hop.start, hop.end]} for hop in session.route
        ],
        "verified_receipts": len(log.work),
        "priority": log.granted,
        "priority_notes": list(log.priority_notes),
        "spot_checks": [
            {
                "peer_id": c.peer_id,
                "blocks": [c.start, c.end],
                "steps": c.steps,
                "verdict": c.verdict,
                "verifiers": list(c.verifiers),
                "beacon_epoch": c.beacon.epoch if c.beacon is not None else None,
                "recomputed_positions": c.recomputed_positions,
                "note": c.note,
            }
            for c in log.checks
        ],
        "disputes": [
            {
                "peer_id": d.peer_id,
                "blocks": [d.work.hop.start, d.work.hop.end],
                "steps": d.steps,
                "verifier": d.verifier.peer_id,
                "trigger": d.trigger,
                "ruling": d.ruling.decision,
                "judge": d.ruling.judge,
                "reason": d.ruling.reason,
            }
            for d in log.disputes
        ],
        "rewinds": [
            {"peer_id": r.peer_id, "blocks": [r.start, r.end], "kept": r.kept, "reason": r.reason}
            for r in log.rewinds
        ],
        "failovers": [
            {
                "peer_id": f.peer_id,
                "blocks": [f.start, f.end],
                "reason": f.reason,
                "replacements": list(f.replacements),
            }
            for f in log.failovers
        ],
    }


def _buy_priority(
    remote: DistributedModelForCausalLM,
    paid: PriorityConfig,
    identity_path: Path,
    fallback_free: bool,
) -> None:
    """Attach a ticket and restrict the route to trusted peers; say what it costs."""
    identity = load_or_create_identity(identity_path)
    backbone = remote.backbone
    manifest = backbone.manifest
    with LedgerClient(paid.ledger_url, identity) as client:
        records = backbone.run(backbone.swarm.servers(manifest.model_digest, manifest.num_blocks))
        try:
            backbone.swarm.trusted = trusted_keys(client, records, paid.min_reputation)
            backbone.run(
                backbone.swarm.route(
                    manifest.model_digest, manifest.num_blocks, 0, manifest.num_blocks
                )
            )
        except RouteUnavailable as error:
            backbone.swarm.trusted = None
            if not fallback_free:
                raise RouteUnavailable(
                    f"no trusted route covers the model ({error}); run without --priority high, "
                    "or add --fallback-free, to use the free route"
                ) from None
            _status.print(f"[yellow]no trusted route ({error}); using the free route[/yellow]")
            return
        bought = TicketWallet(paid.wallet, client).ticket_for(paid, identity.public_key)
    backbone.ticket = bought.ticket
    action = f"bought for {bought.cost} points" if bought.bought else "reused"
    _status.print(
        f"priority ticket {bought.ticket.digest().hex()[:12]} {action}: "
        f"{bought.budget_left} of {bought.ticket.budget} block-tokens left, "
        f"trusted peers: {len(backbone.swarm.trusted or ())}"
    )


def _report(url: str, identity_path: Path, log: SessionLog) -> dict[str, object]:
    with LedgerClient(url, load_or_create_identity(identity_path)) as client:
        summary = report_session(client, log.work, log.checks)
    return {
        "pairs": summary.pairs,
        "attestations": summary.attestations,
        "attestations_dropped": summary.dropped,
    }


def _write_work(path: Path, work: tuple[WorkRecord, ...]) -> None:
    temp = path.with_name(path.name + ".tmp")
    with temp.open("w") as file:
        for record in work:
            file.write(json.dumps(record.to_dict()) + "\n")
    temp.replace(path)
