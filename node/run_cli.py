"""``corolla node run``: serve a span of a model to the swarm until Ctrl-C or SIGTERM.

:func:`register_node_run` adds the command to the ``corolla node`` sub-app. The options are
declared once here (``*Option`` aliases) and turned into a :class:`NodeConfig` by
:func:`node_config`, so ``corolla simulate node`` offers exactly the same ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from corolla.errors import InvalidInput
from corolla.node.checkpoint import parse_span
from corolla.node.scheduler import SchedulerConfig
from corolla.node.server import DEFAULT_IDENTITY, NodeConfig, run_node
from corolla.node.service import ServiceConfig
from corolla.node.sessions import SessionConfig
from corolla.node.tickets import TicketConfig, parse_ledger_key
from corolla.node.wire import WireLimits

__all__ = [
    "BlocksOption",
    "HostOption",
    "IdentityOption",
    "IdleTimeoutOption",
    "InitialPeersOption",
    "LedgerKeyOption",
    "LedgerOption",
    "MaxCacheTokensOption",
    "MaxFreeQueueOption",
    "MaxQueueOption",
    "MaxRequestBytesOption",
    "ModelOption",
    "NumBlocksOption",
    "PortOption",
    "QuantOption",
    "RefreshPeriodOption",
    "node_config",
    "register_node_run",
]

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

_DEFAULT_LIMITS = WireLimits()
_DEFAULT_SESSIONS = SessionConfig()
_DEFAULT_QUEUE = SchedulerConfig()


def node_config(
    *,
    model: Path,
    blocks: str | None,
    num_blocks: int | None,
    initial_peers: list[str] | None,
    host: str,
    port: int,
    identity: Path,
    quant: str,
    max_cache_tokens: int,
    refresh_period: float,
    idle_timeout: float,
    max_request_bytes: int,
    ledger: str | None = None,
    ledger_key: str | None = None,
    max_queue: int = _DEFAULT_QUEUE.max_queue,
    max_free_queue: int = _DEFAULT_QUEUE.max_free_queue,
) -> NodeConfig:
    """The :class:`NodeConfig` the command-line options describe (validated)."""
    peers = tuple(peer for value in initial_peers or () for peer in value.replace(",", " ").split())
    for peer in peers:
        if not peer.startswith("/") or "/p2p/" not in peer:
            raise InvalidInput(f"--initial-peers {peer!r} is not a multiaddr ending in /p2p/PEER")
    if max_cache_tokens < 0:
        raise InvalidInput("--max-cache-tokens must be >= 0")
    if not idle_timeout > 0:
        raise InvalidInput("--idle-timeout must be positive")
    if max_request_bytes < 1:
        raise InvalidInput("--max-request-bytes must be positive")
    if quant not in ("none", "int8", "nf4"):
        raise InvalidInput(f"--quant must be none, int8 or nf4, not {quant!r}")
    if max_queue < 1 or not 0 <= max_free_queue <= max_queue:
        raise InvalidInput("need --max-queue >= 1 and 0 <= --max-free-queue <= --max-queue")
    return NodeConfig(
        model=model,
        blocks=parse_span(blocks) if blocks is not None else None,
        num_blocks=num_blocks,
        initial_peers=peers,
        host=host,
        port=port,
        identity=identity,
        quant=quant,
        refresh_period=refresh_period,
        ledger=ledger,
        service=ServiceConfig(
            limits=WireLimits(max_tensor_bytes=max_request_bytes),
            sessions=SessionConfig(max_cache_tokens=max_cache_tokens, idle_timeout=idle_timeout),
            scheduler=SchedulerConfig(max_queue=max_queue, max_free_queue=max_free_queue),
            tickets=TicketConfig(
                ledger_key=parse_ledger_key(ledger_key) if ledger_key is not None else None
            ),
        ),
    )


def run(
    model: ModelOption,
    blocks: BlocksOption = None,
    num_blocks: NumBlocksOption = None,
    initial_peers: InitialPeersOption = None,
    host: HostOption = "127.0.0.1",
    port: PortOption = 0,
    identity: IdentityOption = DEFAULT_IDENTITY,
    quant: QuantOption = "none",
    max_cache_tokens: MaxCacheTokensOption = _DEFAULT_SESSIONS.max_cache_tokens,
    refresh_period: RefreshPeriodOption = 30.0,
    idle_timeout: IdleTimeoutOption = _DEFAULT_SESSIONS.idle_timeout,
    max_request_bytes: MaxRequestBytesOption = _DEFAULT_LIMITS.max_tensor_bytes,
    ledger: LedgerOption = None,
    ledger_key: LedgerKeyOption = None,
    max_queue: MaxQueueOption = _DEFAULT_QUEUE.max_queue,
    max_free_queue: MaxFreeQueueOption = _DEFAULT_QUEUE.max_free_queue,
) -> None:
    """Serve blocks of a model to the swarm; prints the multiaddr others join with."""
    config = node_config(
        model=model,
        blocks=blocks,
        num_blocks=num_blocks,
        initial_peers=initial_peers,
        host=host,
        port=port,
        identity=identity,
        quant=quant,
        max_cache_tokens=max_cache_tokens,
        refresh_period=refresh_period,
        idle_timeout=idle_timeout,
        max_request_bytes=max_request_bytes,
        ledger=ledger,
        ledger_key=ledger_key,
        max_queue=max_queue,
        max_free_queue=max_free_queue,
    )
    run_node(config)


def register_node_run(node_app: typer.Typer) -> None:
    """Add ``run`` to the ``corolla node`` sub-app."""
    node_app.command("run")(run)
