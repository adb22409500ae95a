"""A node process: start the DHT and P2P, pick and load a span, serve it, announce, withdraw.

Lifecycle of :func:`run_node`, one small step each:

1. load (or create) the Ed25519 identity and run libp2p under the same key;
2. start the node's guard and its DHT process (:mod:`corolla.node.dht_process`) listening on
   ``host:port`` and joining ``initial_peers``; libp2p stays on this machine (no NAT port
   mapping, AutoNAT or relay) unless ``public``; both helpers die with this process, however it
   ends (:mod:`corolla.node.lifeline`);
3. pick the span (``--blocks``, or the ``--num-blocks`` window the swarm covers worst);
4. load the span, announce ``joining``, measure its throughput with real forward passes;
5. register the RPC handlers, announce ``online``, print ``listening on <multiaddr>``;
6. re-announce every ``refresh_period`` (records expire after twice that) and, with a ledger
   URL, print the node's points when they change (:mod:`corolla.node.balance_watch`) and redeem its
   ticketed work (:mod:`corolla.node.settlement`);
7. on SIGINT/SIGTERM withdraw, each step bounded: announce ``offline`` and redeem what is left
   (at once), stop the handlers, stop the DHT and its daemon, exit 0 within about two seconds
   even when the peers are gone.

Tickets are honoured when signed by the ledger whose key ``--ledger-key`` gives, or else the key
``--ledger URL`` reports at startup (asked once, bounded; if the ledger is down then, the
settlement asks again every period). With neither, no ticket is honoured.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import torch
from hivemind.dht import DHT
from hivemind.p2p import P2P

from corolla.errors import InvalidInput
from corolla.node.announcer import Announcer
from corolla.node.balance_watch import PointsWatcher, check_ledger_url
from corolla.node.declaration import ServingDeclaration
from corolla.node.dht_process import DHTPlace, start_dht
from corolla.node.ledger_trust import tickets_line, trusted_service
from corolla.node.lifeline import Lifeline
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.manifest import Manifest, load_manifest
from corolla.node.model.span import Span, load_span
from corolla.node.protocol.records import (
    NodeState,
    ServerRecord,
    fetch_records,
    write_libp2p_identity,
)
from corolla.node.service import Behaviour, NodeService, ServiceConfig
from corolla.node.settlement import Settlement
from corolla.node.verifier import read_calibrations
from corolla.verify.identity import Identity, load_or_create_identity
from corolla.verify.tolerance import PROFILES

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

_WITHDRAW_SECONDS = 2.0
"""How long the ``offline`` announcement may take at shutdown (peers may be gone already)."""


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
    public: bool = False
    """Reach beyond this machine and its LAN: libp2p's NAT port mapping (UPnP / NAT-PMP),
    AutoNAT with hole punching, and relays (auto-relay included), as a node behind a home router
    needs; give it with a ``host`` others can reach (e.g. ``0.0.0.0``). Off by default: a node
    on ``127.0.0.1`` or a LAN probes nothing around it
    (:mod:`corolla.node.protocol.p2p_options`)."""

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

    Its DHT process and libp2p daemon end with it, even if this process is killed.
    """
    if config.service.benchmark_unsigned:
        print(
            "WARNING: benchmark_unsigned: this node checks NO client signature. "
            "For benchmarks only.",
            file=sys.stderr,
            flush=True,
        )
    identity = load_or_create_identity(config.identity)
    checkpoint = Checkpoint(config.model)
    if config.blocks is not None:
        checkpoint.check_span(*config.blocks)
    manifest = load_manifest(checkpoint)
    identity_file = libp2p_identity_path(config.identity)
    write_libp2p_identity(identity, identity_file)
    place = DHTPlace(config.host, config.port, config.initial_peers, identity_file, config.public)
    try:
        with _node_process_settings(), Lifeline() as lifeline:
            dht = start_dht(place, lifeline)
            try:
                asyncio.run(_serve(config, identity, checkpoint, manifest, dht, behaviour))
            finally:
                dht.shutdown()
    finally:
        _exit_without_final_collections()


@contextlib.contextmanager
def _node_process_settings() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C until the event loop takes signals over, system calls are
    restarted rather than failed by signals, and the GIL changes hands quickly; all restored."""
    # If a SIGTERM during startup just killed this process, the DHT process would die with it
    # but not withdraw. EINTR in C code that may not expect it: a node signalled while torch
    # started its shared-memory manager (for hivemind's MPFuture) was once seen spinning forever.
    previous = signal.signal(signal.SIGTERM, _interrupt_in(os.getpid()))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.siginterrupt(signum, False)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(_GIL_SWITCH_SECONDS)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.setswitchinterval(switch_interval)


def _exit_without_final_collections() -> None:
    """Skip the interpreter's last garbage collections when the process exits.

    They walk every object torch and transformers made: 2-4 s of CPU per node (``perf`` showed
    ``gc_collect_main`` at 70 % of a stopping node's time), which a whole swarm stopping at once
    on a small machine pays several times over. Frozen objects are still freed by reference
    counting; only the cycle search is skipped, and only at exit.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


async def _serve(
    config: NodeConfig,
    identity: Identity,
    checkpoint: Checkpoint,
    manifest: Manifest,
    dht: DHT,
    behaviour: Behaviour | None,
) -> None:
    stop = _stop_on_signals()
    start, end = await _pick_span(config, dht, checkpoint, manifest)
    service = await _load_service(config, identity, start, end, behaviour)
    announcer = Announcer(dht, identity, service, config.refresh_period)
    await announcer.store(NodeState.JOINING)
    service.throughput = await asyncio.to_thread(measure_throughput, service.span)
    p2p = await _go_online(dht, service, announcer)
    await _print_serving(identity, service, p2p, config)
    watchers, settlement, declaration = _start_ledger_watchers(config, identity, service, stop)
    try:
        await _refresh_until(stop, announcer)
    finally:
        await _withdraw(service, announcer, p2p, watchers, settlement, declaration)


def _stop_on_signals() -> asyncio.Event:
    """An event the loop sets on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


async def _pick_span(
    config: NodeConfig, dht: DHT, checkpoint: Checkpoint, manifest: Manifest
) -> tuple[int, int]:
    if config.blocks is not None:
        return config.blocks
    records = await fetch_records(dht, manifest.model_digest, checkpoint.num_blocks)
    return choose_span(records, checkpoint.num_blocks, config.num_blocks or 1)


async def _load_service(
    config: NodeConfig, identity: Identity, start: int, end: int, behaviour: Behaviour | None
) -> NodeService:
    """The span's weights, loaded, behind the RPC service (not registered yet)."""
    service_config = await trusted_service(config.service, config.ledger)
    span = await asyncio.to_thread(load_span, config.model, start, end, config.quant)
    directory = await asyncio.to_thread(lambda: Checkpoint(config.model).directory)
    calibrations = read_calibrations(directory, span.model_digest)  # a verifier's thresholds
    # In a thread: a behaviour may load weights of its own when it is attached to the span.
    return await asyncio.to_thread(
        NodeService, span, identity, service_config, behaviour, calibrations
    )


async def _go_online(dht: DHT, service: NodeService, announcer: Announcer) -> P2P:
    """Register the handlers on the DHT's daemon and announce ``online``."""
    p2p = await dht.replicate_p2p()
    await service.add_handlers(p2p)
    service.state = NodeState.ONLINE
    await announcer.store(NodeState.ONLINE)
    return p2p


async def _print_serving(
    identity: Identity, service: NodeService, p2p: P2P, config: NodeConfig
) -> None:
    span = service.span
    print(
        f"corolla node {identity.peer_name}: blocks {span.start}:{span.end} of model "
        f"{span.model_digest.hex()[:16]} ({span.family.name}, {service.dtype_name}, quant "
        f"{span.quant}), {service.throughput:.1f} tokens/s",
        flush=True,
    )
    for maddr in await p2p.get_visible_maddrs():
        print(f"{LISTENING_PREFIX}{maddr}", flush=True)
    print(tickets_line(service.tickets.ledger_key, config.ledger), flush=True)


def _start_ledger_watchers(
    config: NodeConfig, identity: Identity, service: NodeService, stop: asyncio.Event
) -> tuple[list[asyncio.Task[None]], Settlement | None, ServingDeclaration | None]:
    """With a ledger: the points display, the settlement and the serving declaration (what
    makes this node a candidate verifier), running until ``stop``."""
    if config.ledger is None:
        return [], None, None
    url = check_ledger_url(config.ledger)
    points = PointsWatcher(url, identity.public_key, config.refresh_period)
    settlement = Settlement(url, identity, service.tickets, config.refresh_period)
    span = service.span
    profile = PROFILES.get((service.dtype_name, span.quant))
    declaration = (
        None
        if profile is None
        else ServingDeclaration(
            url,
            identity,
            span.model_digest,
            (span.start, span.end),
            profile,
            config.refresh_period,
        )
    )
    tasks = [points.run(stop), settlement.run(stop)]
    if declaration is not None:
        tasks.append(declaration.run(stop))
    return [asyncio.create_task(task) for task in tasks], settlement, declaration


async def _refresh_until(stop: asyncio.Event, announcer: Announcer) -> None:
    """Re-announce ``online`` every period until ``stop`` is set."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), announcer.period)
        if not stop.is_set():
            await announcer.store(NodeState.ONLINE)


async def _withdraw(
    service: NodeService,
    announcer: Announcer,
    p2p: P2P,
    watchers: list[asyncio.Task[None]],
    settlement: Settlement | None,
    declaration: ServingDeclaration | None,
) -> None:
    """Leave the swarm, each step bounded: announce ``offline`` and redeem what is left at the
    same time, stop the handlers and the compute thread, let go of the daemon."""
    for watcher in watchers:
        watcher.cancel()
    await asyncio.gather(*watchers, return_exceptions=True)
    service.state = NodeState.OFFLINE
    last_words = [asyncio.wait_for(announcer.store(NodeState.OFFLINE), _WITHDRAW_SECONDS)]
    if settlement is not None:
        last_words.append(settlement.final())
    if declaration is not None:
        last_words.append(asyncio.wait_for(declaration.withdraw(), _WITHDRAW_SECONDS))
    await asyncio.gather(*last_words, return_exceptions=True)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(service.remove_handlers(p2p), _WITHDRAW_SECONDS)
    service.shutdown()
    with contextlib.suppress(Exception):
        await p2p.shutdown()
    print("corolla node: withdrawn from the swarm, exiting", file=sys.stderr, flush=True)
