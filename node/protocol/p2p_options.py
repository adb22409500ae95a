"""How far a libp2p daemon reaches: this machine and its LAN (the default), or the internet.

hivemind's ``P2P.create`` (and so ``DHT(...)``, which hands its keyword arguments on) switches on,
unless told otherwise, what a peer behind a home router needs: NAT port mapping (it looks for a
UPnP or NAT-PMP gateway and asks it to open a port), AutoNAT with hole punching (it asks peers
to dial it back), and circuit relay (it may reach others through relays, and serves as a relay
for them). A node or client on 127.0.0.1 or a LAN needs none of it, and a test should not probe
the network around the machine. So every Corolla daemon starts with them off, through
:func:`p2p_options`, and only a node started as public (``NodeConfig.public``) turns them on,
with auto-relay as Petals' servers do, so that a node behind a NAT can still be reached.

The daemon's command line shows the choice: ``-natPortMap=0 -autonat=0 -relay=0 -autoRelay=0``
for a local peer, ``=1`` for a public one.
"""

from __future__ import annotations

__all__ = ["p2p_options"]


def p2p_options(public: bool = False) -> dict[str, bool]:
    """Keyword arguments for ``hivemind.P2P.create`` or ``hivemind.DHT``: NAT port mapping,
    AutoNAT, relay and auto-relay all off, or all on for a ``public`` peer."""
    return {
        "nat_port_map": public,
        "auto_nat": public,
        "use_relay": public,
        "use_auto_relay": public,
    }
