"""How `corolla generate` shows its work: the text as it streams, then JSON or a summary.

Text goes to stdout; status and the swarm summary go to stderr, so ``corolla generate ... >
out.txt`` keeps only the text. With ``--json`` stdout holds exactly one JSON object.
"""

from __future__ import annotations

import json
import sys
from collections import Counter

import torch
import typer
from rich.console import Console

from corolla.client.generate_runner import GenerateResult
from corolla.client.head import ClientHead

__all__ = ["TextStream", "print_result"]

_status = Console(stderr=True)


class TextStream:
    """Prints generated text as tokens arrive, holding back incomplete UTF-8 sequences."""

    def __init__(self) -> None:
        self._head: ClientHead | None = None
        self._ids: list[int] = []
        self._printed = 0

    def begin(self, head: ClientHead, prompt: str) -> None:
        self._head = head
        sys.stdout.write(prompt)
        sys.stdout.flush()

    def rewind(self, kept: int) -> None:
        """A node's outputs were proven wrong, or disputed: everything after `kept` tokens is
        regenerated without it."""
        self._ids = self._ids[:kept]
        text = self._decode()
        _status.print(
            "\n[yellow]a spot-check found a node's outputs wrong or in dispute; the session "
            f"stops using it and regenerates the text from token {kept}:[/yellow]"
        )
        sys.stdout.write(text)
        sys.stdout.flush()
        self._printed = len(text)

    def __call__(self, tokens: torch.Tensor) -> None:
        self._ids.append(int(tokens[0]))
        text = self._decode()
        if text.endswith("\ufffd"):
            return  # a multi-byte character is not complete yet
        sys.stdout.write(text[self._printed :])
        sys.stdout.flush()
        self._printed = len(text)

    def _decode(self) -> str:
        if self._head is None:
            return ""
        return self._head.tokenizer.decode(self._ids, skip_special_tokens=True)


def print_result(result: GenerateResult, as_json: bool, prompt: str) -> None:
    """After generation: one JSON object (``--json``), or a newline, the swarm summary and one
    line naming the tokens no spot-check verified."""
    if as_json:
        typer.echo(json.dumps(_as_json(result, prompt)))
        return
    sys.stdout.write("\n")
    if result.swarm is not None:
        _print_summary(result.swarm)
    if result.unverified:
        _status.print(
            "[yellow]unverified: "
            + "; ".join(r.describe() for r in result.unverified)
            + " (no spot-check covered their steps)[/yellow]",
            soft_wrap=True,  # one line, however long
        )


def _as_json(result: GenerateResult, prompt: str) -> dict[str, object]:
    elapsed = result.generate_s
    output: dict[str, object] = {
        "prompt": prompt,
        "prompt_token_ids": result.input_ids[0].tolist(),
        "token_ids": result.new_ids.tolist(),
        "text": result.text,
        "model_digest": result.head.model_digest.hex(),
        "unverified": [r.to_dict() for r in result.unverified],
        "timings": {
            "load_s": round(result.load_s, 4),
            "generate_s": round(elapsed, 4),
            "tokens_per_s": round(len(result.new_ids) / elapsed, 2) if elapsed > 0 else None,
        },
    }
    if result.swarm is not None:
        output["swarm"] = result.swarm
    return output


def _print_summary(summary: dict[str, object]) -> None:
    route = " -> ".join(
        f"{hop['peer_id'][-8:]}[{hop['blocks'][0]}:{hop['blocks'][1]}]"  # type: ignore[index]
        for hop in summary["route"]  # type: ignore[attr-defined]
    )
    _status.print(f"route: {route}")
    _status.print(f"verified receipts: {summary['verified_receipts']}")
    granted = summary["priority"]
    if any(level == "high" for level in granted.values()):  # type: ignore[attr-defined]
        levels = ", ".join(f"{peer[-8:]} {level}" for peer, level in granted.items())  # type: ignore[attr-defined]
        _status.print(f"priority: {levels}")
    for note in summary["priority_notes"]:  # type: ignore[attr-defined]
        _status.print(f"[yellow]priority note from {note}[/yellow]")
    checks = summary["spot_checks"]
    verdicts = Counter(check["verdict"] for check in checks)  # type: ignore[index,union-attr]
    if checks:
        _status.print(
            "spot-checks: " + ", ".join(f"{count} {verdict}" for verdict, count in verdicts.items())
        )
    for dispute in summary["disputes"]:  # type: ignore[attr-defined]
        _status.print(
            f"dispute: {dispute['peer_id'][-8:]} blocks {dispute['blocks']} against verifier "
            f"{dispute['verifier'][-8:]} ({dispute['trigger']}): {dispute['ruling']}, "
            f"judged by {dispute['judge']} ({dispute['reason']})"
        )
    report = summary.get("ledger")
    if isinstance(report, dict):
        _status.print(
            f"reported {report['pairs']} receipts and {report['attestations']} signed verdicts "
            "to the ledger"
        )
    for failover in summary["failovers"]:  # type: ignore[attr-defined]
        _status.print(
            f"failover: {failover['peer_id'][-8:]} blocks {failover['blocks']} replaced by "
            f"{', '.join(p[-8:] for p in failover['replacements'])} ({failover['reason']})"
        )
