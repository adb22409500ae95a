"""How ``corolla ledger`` shows what it read: entries (as JSON, with a one-line detail) and
an audit's report (as JSON or a table)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from corolla.ledger.api.models import Entry
from corolla.ledger.audit import AuditReport

__all__ = ["entry_detail", "entry_dict", "report_dict", "report_table"]


def entry_dict(entry: Entry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "kind": entry.kind,
        "account": entry.account.hex(),
        "amount": entry.amount,
        "ref": entry.ref.hex(),
        "detail": entry_detail(entry),
        "time": entry.time,
    }


def entry_detail(entry: Entry) -> str:
    """One line on what an entry means, from its payload."""
    payload = entry.payload if isinstance(entry.payload, dict) else {}
    short = {key: value.hex()[:16] for key, value in payload.items() if isinstance(value, bytes)}
    if entry.kind == "work_credited":
        checked = (
            f"pair {payload.get('pair')}, checked by attestation {payload.get('attestation')}"
            if "dispute" not in payload
            else f"claim {payload.get('claim')}, checked by the referee in dispute "
            f"{short.get('dispute', '?')}"
        )
        return (
            f"session {short.get('session', '?')} of client {short.get('client', '?')}, {checked}"
        )
    if entry.kind == "verifier_fee":
        return (
            f"checked node {short.get('node', '?')} for client {short.get('client', '?')}: "
            f"{payload.get('units')} block-tokens recomputed"
        )
    if entry.kind == "dispute":
        if not payload.get("judged"):
            return f"unjudged: {payload.get('note')}"
        liars = len(payload.get("lying_verifiers", ()))
        node = "lied" if payload.get("node_lied") else "did not lie"
        return f"judged by the referee: the node {node}; {liars} lying verifier(s)"
    if entry.kind in ("serving_declared", "serving_withdrawn"):
        verb = "serves" if entry.kind == "serving_declared" else "no longer serves"
        return (
            f"{verb} blocks [{payload.get('start')}, {payload.get('end')}) of model "
            f"{short.get('model', '?')} under {payload.get('profile')}"
        )
    if entry.kind == "calibration_published":
        calibration = payload.get("calibration", {})
        if isinstance(calibration, dict):
            return (
                f"{calibration.get('profile')}: honest max {calibration.get('honest_max')} x "
                f"{calibration.get('threshold_margin')}"
            )
    if entry.kind == "fraud_evidence":
        return f"{payload.get('verdict')} (by {payload.get('judge')}): {payload.get('reason')}"
    if entry.kind in ("slash", "reputation_changed"):
        return str(payload.get("reason", ""))
    if entry.kind == "ticket_redeemed":
        return f"{payload.get('units')} block-tokens of ticket {short.get('ticket', '?')}"
    return ""


def report_dict(report: AuditReport) -> dict[str, Any]:
    return {
        "ok": True,
        "source": report.source,
        "origin": report.origin,
        "ledger_key": report.ledger_key.hex(),
        "tree_size": report.tree_size,
        "root_hash": report.root_hash.hex(),
        "operations": report.operations,
        "entries_by_kind": dict(report.kinds),
        "pairs_verified": report.pairs_verified,
        "attestations_verified": report.attestations_verified,
        "evidence_checked": report.evidence_checked,
        "disputes_checked": report.disputes_checked,
        "referee_recomputed": report.referee_recomputed,
        "accounts": report.accounts,
        "points": report.points,
        "consistent_with": report.consistent_with,
        "cached_state_compared": report.cached_state_compared,
    }


def report_table(report: AuditReport, *, remembered: bool) -> Table:
    table = Table(title=f"audit of {report.origin} passed", show_header=False)
    table.add_column("check")
    table.add_column("result")
    table.add_row("ledger key", report.ledger_key.hex())
    table.add_row("entries (tree size)", str(report.tree_size))
    table.add_row("root hash", report.root_hash.hex())
    table.add_row("signed operations verified", str(report.operations))
    table.add_row("receipts re-verified", str(report.pairs_verified))
    table.add_row("attestations re-verified", str(report.attestations_verified))
    table.add_row("fraud evidence re-checked", str(report.evidence_checked))
    table.add_row("disputes re-checked", str(report.disputes_checked))
    if report.referee_recomputed:
        table.add_row("referee convictions recomputed", str(report.referee_recomputed))
    for kind, count in sorted(report.kinds.items()):
        table.add_row(f"  {kind}", str(count))
    table.add_row("accounts", str(report.accounts))
    table.add_row("points in circulation", str(report.points))
    if report.consistent_with is not None:
        consistent = f"consistent with size {report.consistent_with}"
    else:
        consistent = "first audit (state saved)" if remembered else "not compared (no --state)"
    table.add_row("history", consistent)
    table.add_row(
        "cached balances",
        "match the log" if report.cached_state_compared else "not compared (log moved on)",
    )
    return table
