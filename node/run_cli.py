"""``corolla node run``: serve a span of a model to the swarm until Ctrl-C or SIGTERM.

The node's options are declared once, as the fields of :class:`NodeOptions` (each field's type
carries its typer option); :meth:`NodeOptions.config` validates them into a
:class:`~corolla.node.server.NodeConfig`. :func:`options_command` makes a typer command whose
options are the fields of an options dataclass, so ``corolla simulate node`` offers the same
options by extending the dataclass (:mod:`corolla.simulations.node_cli`), and so does
``benchmarks/unsigned.py``. :func:`register_node_run` adds ``run`` to the ``corolla node`` app.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar, get_type_hints

import typer

from corolla.errors import InvalidInput
from corolla.node.model.checkpoint import parse_span
from corolla.node.protocol.tensors import WireLimits
from corolla.node.scheduler import SchedulerConfig
from corolla.node.server import DEFAULT_IDENTITY, NodeConfig, run_node
from corolla.node.service import ServiceConfig
from corolla.node.sessions import SessionConfig
from corolla.node.ticket_book import TicketConfig, parse_ledger_key

__all__ = ["NodeOptions", "options_command", "register_node_run", "run", "serve"]

ModelOption = Annotated[
    Path, typer.Option("--model", help="Checkpoint directory (a Hugging Face model).")
]
BlocksOption = Annotated[
    str | None, typer.Option("--blocks", help="Blocks to serve as START:END, e.g. 0:4.")
]
NumBlocksOption = Annotated[
    int | None,
    typer.Option("--num-blocks", help="Serve this many blocks, where the swarm is weakest."),
]
InitialPeersOption = Annotated[
    list[str] | None,
    typer.Option(
        "--initial-peers",
        help="Multiaddr of a swarm member (repeat, or separate by commas). None: new swarm.",
    ),
]
HostOption = Annotated[str, typer.Option("--host", help="IPv4 address to listen on.")]
PortOption = Annotated[int, typer.Option("--port", help="TCP port to listen on (0: any).")]
IdentityOption = Annotated[
    Path, typer.Option("--identity", help="Ed25519 key file (created if missing).")
]
QuantOption = Annotated[
    str, typer.Option("--quant", help="Quantize the span's linear layers: none, int8 or nf4.")
]
MaxCacheTokensOption = Annotated[
    int,
    typer.Option("--max-cache-tokens", help="KV-cache budget in tokens, over all sessions."),
]
RefreshPeriodOption = Annotated[
    float,
    typer.Option("--refresh-period", help="Seconds between DHT announcements (TTL is 2x)."),
]
IdleTimeoutOption = Annotated[
    float, typer.Option("--idle-timeout", help="Seconds before an idle session is closed.")
]
MaxRequestBytesOption = Annotated[
    int, typer.Option("--max-request-bytes", help="Most tensor bytes one request may carry.")
]
LedgerOption = Annotated[
    str | None,
    typer.Option(
        "--ledger",
        help="Ledger URL: show the points this node earns there, live (polled), redeem ticketed "
        "work there, and honour its tickets.",
    ),
]
LedgerKeyOption = Annotated[
    str | None,
    typer.Option(
        "--ledger-key",
        help="Public key (hex) of the ledger whose priority tickets this node honours "
        "(default: the key --ledger reports).",
    ),
]
MaxQueueOption = Annotated[
    int, typer.Option("--max-queue", help="Computations waiting at most (busy beyond).")
]
MaxFreeQueueOption = Annotated[
    int,
    typer.Option(
        "--max-free-queue",
        help="Free computations waiting at most; the rest of the queue is kept for ticketed ones.",
    ),
]

PublicOption = Annotated[
    bool,
    typer.Option(
        "--public",
        help="Reach beyond this machine and its LAN: NAT port mapping (UPnP / NAT-PMP), AutoNAT "
        "and relays. Off by default: a local node probes nothing around it.",
    ),
]

_DEFAULT_LIMITS = WireLimits()
_DEFAULT_SESSIONS = SessionConfig()
_DEFAULT_QUEUE = SchedulerConfig()


@dataclass(frozen=True, kw_only=True)
class NodeOptions:
    """The options of ``corolla node run`` as the user typed them (one field per option)."""

    model: ModelOption
    blocks: BlocksOption = None
    num_blocks: NumBlocksOption = None
    initial_peers: InitialPeersOption = None
    host: HostOption = "127.0.0.1"
    port: PortOption = 0
    identity: IdentityOption = DEFAULT_IDENTITY
    quant: QuantOption = "none"
    max_cache_tokens: MaxCacheTokensOption = _DEFAULT_SESSIONS.max_cache_tokens
    refresh_period: RefreshPeriodOption = 30.0
    idle_timeout: IdleTimeoutOption = _DEFAULT_SESSIONS.idle_timeout
    max_request_bytes: MaxRequestBytesOption = _DEFAULT_LIMITS.max_tensor_bytes
    ledger: LedgerOption = None
    ledger_key: LedgerKeyOption = None
    max_queue: MaxQueueOption = _DEFAULT_QUEUE.max_queue
    max_free_queue: MaxFreeQueueOption = _DEFAULT_QUEUE.max_free_queue
    public: PublicOption = False

    def config(self) -> NodeConfig:
        """The :class:`NodeConfig` these options describe; :class:`InvalidInput` if they are bad."""
        peers = tuple(
            peer for value in self.initial_peers or () for peer in value.replace(",", " ").split()
        )
        for peer in peers:
            if not peer.startswith("/") or "/p2p/" not in peer:
                raise InvalidInput(
                    f"--initial-peers {peer!r} is not a multiaddr ending in /p2p/PEER"
                )
        if self.max_cache_tokens < 0:
            raise InvalidInput("--max-cache-tokens must be >= 0")
        if not self.idle_timeout > 0:
            raise InvalidInput("--idle-timeout must be positive")
        if self.max_request_bytes < 1:
            raise InvalidInput("--max-request-bytes must be positive")
        if self.quant not in ("none", "int8", "nf4"):
            raise InvalidInput(f"--quant must be none, int8 or nf4, not {self.quant!r}")
        if self.max_queue < 1 or not 0 <= self.max_free_queue <= self.max_queue:
            raise InvalidInput("need --max-queue >= 1 and 0 <= --max-free-queue <= --max-queue")
        ledger_key = parse_ledger_key(self.ledger_key) if self.ledger_key is not None else None
        return NodeConfig(
            model=self.model,
            blocks=parse_span(self.blocks) if self.blocks is not None else None,
            num_blocks=self.num_blocks,
            initial_peers=peers,
            host=self.host,
            port=self.port,
            identity=self.identity,
            quant=self.quant,
            refresh_period=self.refresh_period,
            ledger=self.ledger,
            public=self.public,
            service=ServiceConfig(
                limits=WireLimits(max_tensor_bytes=self.max_request_bytes),
                sessions=SessionConfig(
                    max_cache_tokens=self.max_cache_tokens, idle_timeout=self.idle_timeout
                ),
                scheduler=SchedulerConfig(
                    max_queue=self.max_queue, max_free_queue=self.max_free_queue
                ),
                tickets=TicketConfig(ledger_key=ledger_key),
            ),
        )


Options = TypeVar("Options", bound=NodeOptions)


def options_command(
    options: type[Options], action: Callable[[Options], None]
) -> Callable[..., None]:
    """A typer command taking the fields of the dataclass ``options`` as its options; it calls
    ``action`` with them, and its help is ``action``'s docstring.

    typer reads a command's options from its signature: the command has the signature of
    ``options``' constructor (each field's type resolved where that field is declared), and
    hands what typer parsed straight to it.
    """
    types = get_type_hints(options, include_extras=True)
    fields = inspect.signature(options).parameters.values()

    def command(**parsed: object) -> None:
        action(options(**parsed))  # type: ignore[arg-type]

    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [field.replace(annotation=types[field.name]) for field in fields]
    )
    command.__doc__ = action.__doc__
    command.__name__ = action.__name__
    return command


def serve(options: NodeOptions) -> None:
    """Serve blocks of a model to the swarm; prints the multiaddr others join with."""
    run_node(options.config())


run = options_command(NodeOptions, serve)


def register_node_run(node_app: typer.Typer) -> None:
    """Add ``run`` to the ``corolla node`` sub-app."""
    node_app.command("run")(run)
