"""The node's DHT process: hivemind's, kept on this machine unless public, and tied to the node.

:func:`start_dht` forks hivemind's DHT process, which starts the libp2p daemon, listening on
``host:port`` and joining ``initial_peers``. Its libp2p options come from
:func:`corolla.node.protocol.p2p_options.p2p_options`: no NAT port mapping, AutoNAT or relay unless
the node is ``public``. The process dies with the node's main process, and its daemon is stopped
by the node's :class:`~corolla.node.lifeline.Lifeline` (see :mod:`corolla.node.lifeline`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hivemind.dht import DHT

from corolla.errors import NodeUnavailable
from corolla.node.lifeline import MARK_VARIABLE, Lifeline, die_with_parent
from corolla.node.protocol.p2p_options import p2p_options
from corolla.node.protocol.records import RecordValidator

__all__ = ["DHTPlace", "start_dht"]

_STARTUP_SECONDS = 30.0
_SHUTDOWN_SECONDS = 1.0
"""How long ``DHT.shutdown`` waits for the DHT process before it terminates it. It takes well
under 0.1 s, unless its daemon is gone already (a Ctrl-C in a terminal reaches the daemon too):
then it waits for this bound."""


@dataclass(frozen=True)
class DHTPlace:
    """Where the node's DHT listens, whom it joins, and how far it reaches."""

    host: str
    port: int
    initial_peers: tuple[str, ...]
    identity_file: Path
    """The node's key in libp2p's format (its peer id)."""
    public: bool = False


class _NodeDHT(DHT):
    """hivemind's DHT process, bound to the node that forks it (``node_pid``) and carrying the
    node's mark (``mark``) into its libp2p daemon's environment."""

    node_pid: int
    mark: str

    def run(self) -> None:
        die_with_parent(self.node_pid)
        os.environ[MARK_VARIABLE] = self.mark
        super().run()


def start_dht(place: DHTPlace, lifeline: Lifeline) -> DHT:
    """Fork the DHT process and wait until it has joined the swarm (:class:`NodeUnavailable` if
    it cannot)."""
    try:
        dht = _NodeDHT(
            initial_peers=list(place.initial_peers) or None,
            start=False,
            host_maddrs=[f"/ip4/{place.host}/tcp/{place.port}"],
            identity_path=str(place.identity_file),
            # hivemind's check assumes RSA identities; ours is Ed25519 and unique per key file.
            check_if_identity_free=False,
            startup_timeout=_STARTUP_SECONDS,
            shutdown_timeout=_SHUTDOWN_SECONDS,
            record_validators=[RecordValidator()],
            **p2p_options(place.public),
        )
        dht.node_pid = os.getpid()
        dht.mark = lifeline.mark
        dht.run_in_background(await_ready=True)
    except Exception as error:
        raise NodeUnavailable(f"cannot start the DHT or join the swarm: {error}") from None
    return dht
