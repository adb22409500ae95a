"""`corolla generate`: text from a prompt, locally or through the swarm.

The command reads like a form: its options (declared below) become one
:class:`~corolla.client.generate_options.GenerateOptions`, which
:func:`~corolla.client.generate_runner.run_generation` carries out and
:func:`~corolla.client.generate_printer.print_result` shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from corolla.client.generate_options import GenerateOptions
from corolla.client.generate_printer import TextStream, print_result
from corolla.client.generate_runner import run_generation
from corolla.client.priority import DEFAULT_WALLET, PriorityConfig
from corolla.client.swarm import DEFAULT_CLIENT_IDENTITY

__all__ = ["generate_command", "register"]

Prompt = Annotated[str, typer.Argument(help="The text to continue (with --chat: the message).")]
Chat = Annotated[
    bool, typer.Option("--chat", help="PROMPT is a chat message: use the chat template.")
]
System = Annotated[str | None, typer.Option("--system", help="With --chat: a system message.")]
Model = Annotated[Path, typer.Option("--model", help="Checkpoint directory (the client side).")]
InitialPeers = Annotated[
    list[str],
    typer.Option(
        "--initial-peers", help="Multiaddr of a swarm member (repeat, or separate by commas)."
    ),
]
Local = Annotated[bool, typer.Option("--local", help="Run every block in this process.")]
Spans = Annotated[int, typer.Option("--spans", help="With --local: split the blocks in N spans.")]
Splits = Annotated[
    str | None,
    typer.Option(
        "--splits", help="With --local: explicit spans, e.g. 0:3,3:8 (overrides --spans)."
    ),
]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")]
Sample = Annotated[bool, typer.Option("--sample", help="Sample instead of greedy decoding.")]
Temperature = Annotated[float | None, typer.Option(help="Sampling temperature (implies --sample).")]
TopK = Annotated[
    int | None, typer.Option("--top-k", help="Keep the k likeliest (implies --sample).")
]
TopP = Annotated[float | None, typer.Option("--top-p", help="Nucleus mass (implies --sample).")]
Seed = Annotated[int | None, typer.Option(help="Seed for sampling (same seed, same text).")]
NoEos = Annotated[bool, typer.Option("--no-eos", help="Do not stop at the end-of-text token.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of text.")]
Receipts = Annotated[
    Path | None,
    typer.Option("--receipts", help="Write every verified (request, receipt) pair as JSON lines."),
]
IdentityFile = Annotated[Path, typer.Option("--identity", help="The client's Ed25519 key file.")]
Allow = Annotated[list[str], typer.Option("--allow", help="Use only these peer ids (repeat).")]
Block = Annotated[list[str], typer.Option("--block", help="Never use these peer ids (repeat).")]
StepTimeout = Annotated[float, typer.Option("--step-timeout", help="Seconds per node step.")]
CheckRate = Annotated[
    float,
    typer.Option("--check-rate", help="Fraction of steps spot-checked on a second peer (0 = off)."),
]
Ledger = Annotated[
    str | None,
    typer.Option(
        "--ledger",
        help="Ledger URL: it assigns the spot-checks' verifiers, judges disputes, and is told "
        "the work.",
    ),
]
Priority = Annotated[
    str,
    typer.Option("--priority", help="free, or high: pay points for a ticket and trusted peers."),
]
MinReputation = Annotated[
    int,
    typer.Option("--min-reputation", help="With --priority high: the reputation a peer needs."),
]
FallbackFree = Annotated[
    bool,
    typer.Option(
        "--fallback-free", help="With --priority high: use the free route if no trusted one."
    ),
]
TicketBudget = Annotated[
    int,
    typer.Option(
        "--ticket-budget",
        help="With --priority high: block-tokens (= points) a newly bought ticket holds.",
    ),
]
Wallet = Annotated[
    Path,
    typer.Option("--wallet", help="With --priority high: where bought tickets are kept."),
]
RequireChecks = Annotated[
    bool,
    typer.Option(
        "--require-checks",
        help="Fail rather than return text whose steps no spot-check verified.",
    ),
]


def generate_command(
    prompt: Prompt,
    model: Model,
    initial_peers: InitialPeers = [],  # noqa: B006  (typer reads the default, never mutates it)
    local: Local = False,
    spans: Spans = 2,
    splits: Splits = None,
    max_new_tokens: MaxNewTokens = 32,
    sample: Sample = False,
    temperature: Temperature = None,
    top_k: TopK = None,
    top_p: TopP = None,
    seed: Seed = None,
    no_eos: NoEos = False,
    as_json: AsJson = False,
    receipts: Receipts = None,
    identity: IdentityFile = DEFAULT_CLIENT_IDENTITY,
    allow: Allow = [],  # noqa: B006
    block: Block = [],  # noqa: B006
    step_timeout: StepTimeout = 30.0,
    check_rate: CheckRate = 0.05,
    ledger: Ledger = None,
    priority: Priority = "free",
    min_reputation: MinReputation = 1,
    fallback_free: FallbackFree = False,
    ticket_budget: TicketBudget = PriorityConfig.budget,
    wallet: Wallet = DEFAULT_WALLET,
    require_checks: RequireChecks = False,
    chat: Chat = False,
    system: System = None,
) -> None:
    """Generate text after PROMPT, streamed to the terminal as it is produced."""
    options = GenerateOptions(
        prompt=prompt,
        model=model,
        initial_peers=tuple(initial_peers),
        local=local,
        spans=spans,
        splits=splits,
        max_new_tokens=max_new_tokens,
        sample=sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        no_eos=no_eos,
        as_json=as_json,
        receipts=receipts,
        identity=identity,
        allow=tuple(allow),
        block=tuple(block),
        step_timeout=step_timeout,
        check_rate=check_rate,
        ledger=ledger,
        priority=priority,
        min_reputation=min_reputation,
        fallback_free=fallback_free,
        ticket_budget=ticket_budget,
        wallet=wallet,
        require_checks=require_checks,
        chat=chat,
        system=system,
    )
    result = run_generation(options, None if options.as_json else TextStream())
    print_result(result, options.as_json, options.prompt)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
