"""`corolla generate`'s options as one checked value, and the configs they imply.

The command line builds a :class:`GenerateOptions` in one place; every check of the options
together happens here, before anything is loaded, and the runner reads the configs from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from corolla.client.generation import GenerationConfig
from corolla.client.local import even_splits
from corolla.client.priority import DEFAULT_WALLET, PriorityConfig
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import DEFAULT_CLIENT_IDENTITY, ClientConfig
from corolla.errors import InvalidInput
from corolla.node.model.checkpoint import parse_span

__all__ = ["PRIORITIES", "GenerateOptions"]

PRIORITIES = ("free", "high")


@dataclass(frozen=True)
class GenerateOptions:
    """Everything `corolla generate` was asked to do (see its ``--help`` for each option)."""

    prompt: str
    model: Path
    initial_peers: tuple[str, ...] = ()
    """Multiaddrs; an item may hold several separated by commas."""
    local: bool = False
    spans: int = 2
    splits: str | None = None
    max_new_tokens: int = 32
    sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    no_eos: bool = False
    as_json: bool = False
    receipts: Path | None = None
    identity: Path = DEFAULT_CLIENT_IDENTITY
    allow: tuple[str, ...] = ()
    block: tuple[str, ...] = ()
    step_timeout: float = 30.0
    check_rate: float = 0.05
    ledger: str | None = None
    priority: str = "free"
    min_reputation: int = 1
    fallback_free: bool = False
    ticket_budget: int = PriorityConfig.budget
    wallet: Path = DEFAULT_WALLET
    require_checks: bool = False
    chat: bool = False
    """The prompt is a chat message, put through the checkpoint's chat template."""
    system: str | None = None
    """With ``chat``: a system message before it."""

    def __post_init__(self) -> None:
        if not self.prompt:
            raise InvalidInput("the prompt is empty: give some text to continue")
        if self.system is not None and not self.chat:
            raise InvalidInput("--system goes with --chat (a system message opens a chat)")
        if self.local == bool(self.peers):
            raise InvalidInput("give either --local or --initial-peers ADDR (where the swarm is)")
        if self.priority not in PRIORITIES:
            raise InvalidInput("--priority is free or high")
        if self.priority == "high" and self.ledger is None:
            raise InvalidInput("--priority high needs --ledger URL (tickets are bought there)")
        if self.local and self.receipts is not None:
            raise InvalidInput("--receipts needs the swarm: local generation signs nothing")
        if self.require_checks and not self.local and self.checks is None:
            raise InvalidInput("--require-checks needs spot-checks: give --check-rate above 0")
        self.generation.validate()
        # The configs check themselves: build them now, so a bad option fails before loading.
        if self.local:
            if self.splits:
                self.local_splits(0)
        else:
            _ = (self.client, self.paid, self.checks)

    @property
    def peers(self) -> tuple[str, ...]:
        return tuple(p for item in self.initial_peers for p in item.split(",") if p)

    @property
    def generation(self) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.sample
            or self.temperature is not None
            or self.top_k is not None
            or self.top_p is not None,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop_at_eos=not self.no_eos,
        )

    def local_splits(self, num_blocks: int) -> list[tuple[int, int]]:
        """With --local: the spans to chain (--splits, else --spans even parts)."""
        if self.splits:
            return [parse_span(part) for part in self.splits.split(",")]
        return even_splits(num_blocks, self.spans)

    @property
    def client(self) -> ClientConfig:
        return ClientConfig(
            initial_peers=self.peers,
            identity=self.identity,
            allow=frozenset(self.allow),
            block=frozenset(self.block),
            step_timeout=self.step_timeout,
        )

    @property
    def paid(self) -> PriorityConfig | None:
        """The ticket to buy (or reuse) with --priority high; None for free use."""
        if self.priority != "high" or self.ledger is None:
            return None
        return PriorityConfig(
            ledger_url=self.ledger,
            budget=self.ticket_budget,
            min_budget_left=min(self.ticket_budget, PriorityConfig.min_budget_left),
            min_reputation=self.min_reputation,
            wallet=self.wallet,
        )

    @property
    def checks(self) -> SpotCheckConfig | None:
        """Spot-checks at --check-rate (at least the priority rate when paying); None if 0."""
        paid = self.paid
        rate = max(self.check_rate, paid.check_rate) if paid is not None else self.check_rate
        return SpotCheckConfig(rate=rate) if rate > 0 else None
