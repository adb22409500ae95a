"""A node process: start the DHT and P2P, pick and load a span, serve it, announce, withdraw.

Lifecycle of :func:`run_node`:

1. load (or create) the Ed25519 identity and run libp2p under the same key;
2. start the DHT (its own process) listening on ``host:port``, joining ``initial_peers``;
3. choose the span (``--blocks``, or the ``--num-blocks`` window the swarm covers worst);
4. announce ``joining``, load the span, measure its throughput with real forward passes;
5. register the RPC handlers, announce ``online``, print ``listening on <multiaddr>``;
6. re-announce every ``refresh_period`` (records expire after twice that) and, with a ledger
   URL, print the node's points when they change (:mod:`corolla.node.balance_watch`) and redeem its
   ticketed work (:mod:`corolla.node.settlement`);
7. on SIGINT/SIGTERM announce ``offline``, stop the handlers, redeem what is left (bounded),
   stop the DHT and its daemons, exit 0.

Tickets are honoured when signed by the ledger whose key ``--ledger-key`` gives, or else the key
``--ledger URL`` reports at startup (asked once, bounded; if the ledger is down then, the
settlement asks again every period). With neither, no ticket is honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType

import torch
from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from corolla.errors import InvalidInput, NodeUnavailable
from corolla.node.balance_watch import PointsWatcher, check_ledger_url
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.manifest import Manifest, load_manifest
from corolla.node.model.span import Span, load_span
from corolla.node.protocol.records import (
    NodeState,
    RecordValidator,
    ServerRecord,
    announce,
    fetch_records,
    sign_record,
    write_libp2p_identity,
)
from corolla.node.service import BENCHMARK_UNSIGNED_ENV, Behaviour, NodeService, ServiceConfig
from corolla.node.settlement import Settlement, fetch_ledger_key
from corolla.verify.identity import Identity, load_or_create_identity, peer_name_of
from corolla.version import __version__

__all__ = [
    "DEFAULT_IDENTITY",
    "LISTENING_PREFIX",
    "NodeConfig",
    "choose_span",
    "libp2p_identity_path",
    "measure_throughput",
    "run_node",
]

DEFAULT_IDENTITY = Path.home() / ".corolla" / "node.key"
LISTENING_PREFIX = "listening on "
"""Start of the line a node prints, once serving, with the multiaddr others join with."""
logger = logging.getLogger("corolla.node")


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``corolla node run`` is told."""

    model: Path
    blocks: tuple[int, int] | None = None
    num_blocks: int | None = None
    initial_peers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    identity: Path = DEFAULT_IDENTITY
    quant: str = "none"
    refresh_period: float = 30.0
    service: ServiceConfig = field(default_factory=ServiceConfig)
    ledger: str | None = None
    """URL of a ledger: the node shows the points it has earned there, live, redeems its
    ticketed work there, and (without ``service.tickets.ledger_key``) honours its tickets."""

    def __post_init__(self) -> None:
        if (self.blocks is None) == (self.num_blocks is None):
            raise InvalidInput("give exactly one of --blocks A:B and --num-blocks K")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise InvalidInput("--num-blocks must be at least 1")
        if not self.refresh_period > 0:
            raise InvalidInput("--refresh-period must be positive")
        if not 0 <= self.port < 65536:
            raise InvalidInput("--port must be in 0..65535")
        if self.ledger is not None:
            check_ledger_url(self.ledger)


def libp2p_identity_path(identity_path: Path) -> Path:
    """Where the libp2p copy of the node's key lives: beside the Ed25519 key file."""
    return identity_path.with_name(identity_path.name + ".libp2p")


def choose_span(
    records: list[dict[str, ServerRecord]], num_blocks: int, span_length: int
) -> tuple[int, int]:
    """The window of ``span_length`` blocks the swarm serves worst (as Petals chooses).

    Coverage of a block is the summed throughput of its live servers; windows compare by their
    weakest block, then by total coverage, then by position.
    """
    if not 1 <= span_length <= num_blocks:
        raise InvalidInput(f"--num-blocks must be in 1..{num_blocks} for this model")
    coverage = [
        sum(r.throughput for r in servers.values() if r.state != NodeState.OFFLINE)
        for servers in records
    ]
    coverage += [0.0] * (num_blocks - len(coverage))
    windows = range(num_blocks - span_length + 1)
    start = min(
        windows,
        key=lambda s: (min(coverage[s : s + span_length]), sum(coverage[s : s + span_length]), s),
    )
    return start, start + span_length


@torch.inference_mode()
def measure_throughput(span: Span, prompt: int = 16, steps: int = 8) -> float:
    """Tokens per second of single-token steps through the whole span, after a short prefill."""
    hidden_size = span.hidden_size
    generator = torch.Generator().manual_seed(0)
    cache = span.new_cache(1)
    steps = max(1, min(steps, span.max_length))
    prompt = max(0, min(prompt, span.max_length - steps))
    if prompt:
        shape = (1, prompt, hidden_size)
        span.forward(torch.randn(shape, generator=generator, dtype=span.dtype), cache)
    timings = []
    for _ in range(steps):
        hidden = torch.randn(1, 1, hidden_size, generator=generator, dtype=span.dtype)
        began = time.perf_counter()
        span.forward(hidden, cache)
        timings.append(time.perf_counter() - began)
    return 1.0 / max(statistics.median(timings), 1e-9)


class _Announcer:
    """Builds, signs and stores the node's record; remembers the last expiry it stored."""

    def __init__(self, dht: DHT, identity: Identity, template: ServerRecord, period: float):
        self.dht = dht
        self.identity = identity
        self.template = template
        self.period = period
        self.last_expiry = 0.0

    async def store(self, service: NodeService | None, state: str) -> bool:
        # The DHT keeps the entry with the latest expiry per subkey: never go backwards.
        expires_at = max(get_dht_time() + 2 * self.period, self.last_expiry + 0.01)
        record = replace(
            self.template,
            state=state,
            expires_at=expires_at,
            throughput=service.throughput if service is not None else 0.0,
            cache_tokens_free=max(service.sessions.free_tokens, 0) if service is not None else 0,
        )
        self.last_expiry = expires_at
        stored = await announce(self.dht, sign_record(self.identity, record))
        if not stored:
            logger.warning("could not store the %s record in the DHT", state)
        return stored


def _start_dht(config: NodeConfig, identity: Identity) -> DHT:
    identity_file = libp2p_identity_path(config.identity)
    write_libp2p_identity(identity, identity_file)
    try:
        return DHT(
            initial_peers=list(config.initial_peers) or None,
            start=True,
            host_maddrs=[f"/ip4/{config.host}/tcp/{config.port}"],
            identity_path=str(identity_file),
            # hivemind's check assumes RSA identities; ours is Ed25519 and unique per key file.
            check_if_identity_free=False,
            startup_timeout=30,
            record_validators=[RecordValidator()],
        )
    except Exception as error:
        raise NodeUnavailable(f"cannot start the DHT or join the swarm: {error}") from None


async def _trusted_ledger(config: NodeConfig) -> ServiceConfig:
    """The service's config with the key of the ledger whose tickets it honours: ``--ledger-key``,
    else the key ``--ledger URL`` reports (one bounded request; a warning if it fails)."""
    service = config.service
    if config.ledger is None:
        return service
    from corolla.ledger.api.client import AsyncLedgerClient, ClientConfig

    url = check_ledger_url(config.ledger)
    try:
        async with AsyncLedgerClient(url, config=ClientConfig(timeout_s=5.0, attempts=1)) as ledger:
            reported = await asyncio.wait_for(fetch_ledger_key(ledger), 10)
    except Exception as error:
        if service.tickets.ledger_key is None:
            print(
                f"warning: cannot get the ledger's key from {url} ({str(error)[:200]}); "
                "tickets are not honoured until it answers",
                flush=True,
            )
        return service
    configured = service.tickets.ledger_key
    if configured is None:
        return replace(service, tickets=replace(service.tickets, ledger_key=reported))
    if configured != reported:
        print(
            f"warning: --ledger-key is ledger {peer_name_of(configured)} but {url} is ledger "
            f"{peer_name_of(reported)}: tickets it sells are not honoured, redemptions will fail",
            flush=True,
        )
    return service


def _tickets_line(service: NodeService, config: NodeConfig) -> str:
    key = service.tickets.ledger_key
    if key is None and config.ledger is None:
        return "tickets: not honoured (give --ledger URL or --ledger-key HEX to honour them)"
    if key is None:
        return f"tickets: not honoured until {config.ledger} says its key"
    line = f"tickets: honoured when signed by ledger {peer_name_of(key)}"
    if config.ledger is None:
        line += "; no --ledger, so ticketed work is not redeemed"
    return line


def _interrupt_in(main_pid: int) -> Callable[[int, FrameType | None], None]:
    """A SIGTERM handler raising KeyboardInterrupt in this process; forked children just die."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt

    return handler


_GIL_SWITCH_SECONDS = 0.0005
"""How long the compute thread may hold the GIL while the event loop waits for it (Python's
default is 5 ms). A forward of small tensors is mostly Python, so under load the loop thread
waited up to 5 ms per hand-over to read each request, ticketed ones included: with 4 free
clients a ticketed step took 3.2x its unloaded time at 5 ms and 2.1x at 0.5 ms
(benchmarks/priority_under_load.py)."""


def run_node(config: NodeConfig, behaviour: Behaviour | None = None) -> None:
    """Run a node until SIGINT or SIGTERM; returns after a clean withdrawal.

    With ``COROLLA_BENCHMARK_UNSIGNED=1`` in the environment (benchmarks only) the node checks no
    client signature and signs its receipts with zeros; it says so loudly at startup.
    """
    if os.environ.get(BENCHMARK_UNSIGNED_ENV) == "1":
        config = replace(config, service=replace(config.service, benchmark_unsigned=True))
    if config.service.benchmark_unsigned:
        print(
            f"WARNING: {BENCHMARK_UNSIGNED_ENV}=1: this node checks NO client signature and signs "
            "NO receipt (all-zero signatures). For benchmarks only: normal clients reject it.",
            file=sys.stderr,
            flush=True,
        )
    identity = load_or_create_identity(config.identity)
    checkpoint = Checkpoint(config.model)
    if config.blocks is not None:
        checkpoint.check_span(*config.blocks)
    manifest = load_manifest(checkpoint)
    # Until the event loop takes signals over, SIGTERM interrupts like Ctrl-C does, so that the
    # DHT process and its daemons are still shut down (if the process just died, the DHT
    # process would outlive it). System calls restart rather than fail with EINTR in C code
    # that may not expect it: a node signalled while torch started its shared-memory manager
    # (for hivemind's MPFuture) was once seen spinning forever.
    previous = signal.signal(signal.SIGTERM, _interrupt_in(os.getpid()))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.siginterrupt(signum, False)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(_GIL_SWITCH_SECONDS)
    try:
        dht = _start_dht(config, identity)
        try:
            asyncio.run(_serve(config, identity, checkpoint, manifest, dht, behaviour))
        finally:
            dht.shutdown()
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.setswitchinterval(switch_interval)


async def _serve(
    config: NodeConfig,
    identity: Identity,
    checkpoint: Checkpoint,
    manifest: Manifest,
    dht: DHT,
    behaviour: Behaviour | None,
) -> None:
    model_digest = manifest.model_digest
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    if config.blocks is not None:
        start, end = config.blocks
    else:
        records = await fetch_records(dht, model_digest, checkpoint.num_blocks)
        start, end = choose_span(records, checkpoint.num_blocks, config.num_blocks or 1)
    template = ServerRecord(
        peer_id=dht.peer_id.to_base58(),
        public_key=identity.public_key,
        model_digest=model_digest,
        span_digest=manifest.span_digest(start, end),
        start=start,
        end=end,
        throughput=0.0,
        cache_tokens_free=0,
        quant=config.quant,
        dtype="float32",
        state=NodeState.JOINING,
        version=__version__,
        expires_at=0.0,
    )
    announcer = _Announcer(dht, identity, template, config.refresh_period)
    await announcer.store(None, NodeState.JOINING)

    service_config = await _trusted_ledger(config)
    span = await asyncio.to_thread(load_span, config.model, start, end, config.quant)
    # In a thread: a behaviour may load weights of its own when it is attached to the span.
    service = await asyncio.to_thread(NodeService, span, identity, service_config, behaviour)
    announcer.template = replace(
        template, dtype=service.dtype_name, quant=span.quant, span_digest=span.digest
    )
    service.throughput = await asyncio.to_thread(measure_throughput, span)
    p2p = await dht.replicate_p2p()
    await service.add_handlers(p2p)
    service.state = NodeState.ONLINE
    await announcer.store(service, NodeState.ONLINE)

    maddrs = [str(addr) for addr in await p2p.get_visible_maddrs()]
    print(
        f"corolla node {identity.peer_name}: blocks {start}:{end} of model "
        f"{model_digest.hex()[:16]} ({span.family.name}, {service.dtype_name}, quant "
        f"{span.quant}), {service.throughput:.1f} tokens/s",
        flush=True,
    )
    for maddr in maddrs:
        print(f"{LISTENING_PREFIX}{maddr}", flush=True)
    print(_tickets_line(service, config), flush=True)

    watchers: list[asyncio.Task[None]] = []
    settlement: Settlement | None = None
    if config.ledger is not None:
        url = check_ledger_url(config.ledger)
        points = PointsWatcher(url, identity.public_key, config.refresh_period)
        settlement = Settlement(url, identity, service.tickets, config.refresh_period)
        watchers = [
            asyncio.create_task(points.run(stop)),
            asyncio.create_task(settlement.run(stop)),
        ]
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), config.refresh_period)
            if not stop.is_set():
                await announcer.store(service, NodeState.ONLINE)
    finally:
        for watcher in watchers:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        service.state = NodeState.OFFLINE
        with contextlib.suppress(Exception):
            await asyncio.wait_for(announcer.store(service, NodeState.OFFLINE), 10)
        with contextlib.suppress(Exception):
            await service.remove_handlers(p2p)
        if settlement is not None:
            with contextlib.suppress(Exception):
                await settlement.final()
        service.shutdown()
        with contextlib.suppress(Exception):
            await p2p.shutdown()
        print("corolla node: withdrawn from the swarm, exiting", file=sys.stderr, flush=True)
