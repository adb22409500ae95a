"""``corolla node run``: serve a span of a model to the swarm until Ctrl-C or SIGTERM.

:func:`register_node_run` adds the command to the ``corolla node`` sub-app. The node's options
are declared once, as the parameters of :func:`node_config` (which validates them into a
:class:`NodeConfig`); :func:`with_node_options` makes a command of any ``f(config, ...)`` that
takes them all, so ``corolla simulate node`` offers exactly the same ones.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from corolla.errors import InvalidInput
from corolla.node.model.checkpoint import parse_span
from corolla.node.protocol.messages import WireLimits
from corolla.node.scheduler import SchedulerConfig
from corolla.node.server import DEFAULT_IDENTITY, NodeConfig, run_node
from corolla.node.service import ServiceConfig
from corolla.node.sessions import SessionConfig
from corolla.node.ticket_book import TicketConfig, parse_ledger_key

__all__ = ["node_config", "register_node_run", "with_node_options"]

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


def with_node_options(command: Callable[..., None]) -> Callable[..., None]:
    """A typer command taking every option of :func:`node_config` and the parameters of
    ``command(config, ...)`` after the first; ``command`` gets the validated NodeConfig."""
    node_parameters = inspect.signature(node_config, eval_str=True).parameters
    own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
    clash = sorted(set(node_parameters) & {parameter.name for parameter in own})
    if clash:
        raise TypeError(f"{command.__name__} redeclares node options: {', '.join(clash)}")
    merged = [*node_parameters.values(), *own]
    # Parameters without a default first, as Python requires; all keyword-only, as typer passes.
    ordered = [p for p in merged if p.default is p.empty]
    ordered += [p for p in merged if p.default is not p.empty]

    @functools.wraps(command)
    def wrapper(**options: Any) -> None:
        node_options = {name: options.pop(name) for name in node_parameters}
        command(node_config(**node_options), **options)

    wrapper.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in ordered]
    )
    del wrapper.__wrapped__  # typer must read the merged signature, not command's
    wrapper.__annotations__ = {p.name: p.annotation for p in ordered}
    return wrapper


@with_node_options
def run(config: NodeConfig) -> None:
    """Serve blocks of a model to the swarm; prints the multiaddr others join with."""
    run_node(config)


def register_node_run(node_app: typer.Typer) -> None:
    """Add ``run`` to the ``corolla node`` sub-app."""
    node_app.command("run")(run)
