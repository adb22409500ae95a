"""The seam between the client and the network: every way it reaches the swarm, in one object.

A :class:`~corolla.client.swarm.Swarm` is given a :class:`SwarmTransport`; sessions open their
streams through it (a :class:`StreamFactory`), and so do spot-checks (a verifier's check session
is an inference stream that takes check steps); discovery reads node records and pings through
it. :class:`HivemindTransport` is the real one (the libp2p DHT and
:mod:`corolla.node.protocol.stream`); tests may give an in-process stand-in for the network and
drive the client's failover and check logic without daemons.

Every call raises what the raw client does: :class:`~corolla.errors.NodeUnavailable` when a
node cannot be reached, is dead or too slow, :class:`~corolla.errors.NodeBusy` /
:class:`~corolla.errors.RemoteError` when it refuses.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from hivemind import DHT
from hivemind.p2p import P2P, PeerID

from corolla.errors import NodeUnavailable
from corolla.node.protocol.messages import (
    CheckMessage,
    CheckOutput,
    NodeInfo,
    OpenSession,
    SessionOpened,
    StepMessage,
    StepOutput,
)
from corolla.node.protocol.p2p_options import p2p_options
from corolla.node.protocol.records import RecordValidator, ServerRecord, fetch_records
from corolla.node.protocol.stream import InferenceStream, request_forward, request_info

__all__ = ["HivemindTransport", "NodeStream", "StreamFactory", "SwarmTransport"]


class NodeStream(Protocol):
    """One inference session on one node (:class:`InferenceStream` is the real one)."""

    async def open(self, request: OpenSession, timeout: float) -> SessionOpened: ...

    async def step(self, step: StepMessage, timeout: float) -> StepOutput: ...

    async def check(self, check: CheckMessage, timeout: float) -> CheckOutput:
        """A check step on a verifier's check session: its recomputation and signed verdict."""
        ...

    async def close(self) -> None:
        """End the session politely (the node frees its cache)."""
        ...

    async def abort(self) -> None:
        """Drop the stream at once."""
        ...


class StreamFactory(Protocol):
    def open_stream(self, peer_id: str) -> NodeStream:
        """A stream to ``peer_id``, not yet connected (the first ``open`` connects)."""
        ...


class SwarmTransport(StreamFactory, Protocol):
    async def fetch_records(
        self, model_digest: bytes, num_blocks: int
    ) -> list[dict[str, ServerRecord]]:
        """For each block of the model, the valid, online records of its servers by peer id."""
        ...

    async def info(self, peer_id: str, timeout: float) -> NodeInfo:
        """What a node says of itself (``rpc_info``); also the client's ping."""
        ...

    async def forward(self, peer_id: str, step: StepMessage, timeout: float) -> StepOutput:
        """A one-shot forward of a whole sequence (``rpc_forward``); no session is kept."""
        ...

    async def shutdown(self) -> None: ...


class HivemindTransport:
    """The swarm through hivemind: a client-mode DHT and its libp2p daemon."""

    def __init__(self, dht: DHT, p2p: P2P) -> None:
        self.dht = dht
        self.p2p = p2p

    @classmethod
    async def connect(cls, initial_peers: tuple[str, ...], timeout: float) -> HivemindTransport:
        try:
            dht = await asyncio.to_thread(
                DHT,
                **p2p_options(),  # a client never probes the network around the machine
                initial_peers=list(initial_peers),
                client_mode=True,
                start=True,
                record_validators=[RecordValidator()],
                startup_timeout=timeout,
            )
        except Exception as error:
            raise NodeUnavailable(
                f"cannot join the swarm through {', '.join(initial_peers)}: {error}"
            ) from None
        return cls(dht, await dht.replicate_p2p())

    def open_stream(self, peer_id: str) -> InferenceStream:
        return InferenceStream(self.p2p, _peer(peer_id))

    async def fetch_records(
        self, model_digest: bytes, num_blocks: int
    ) -> list[dict[str, ServerRecord]]:
        return await fetch_records(self.dht, model_digest, num_blocks)

    async def info(self, peer_id: str, timeout: float) -> NodeInfo:
        return await request_info(self.p2p, _peer(peer_id), timeout=timeout)

    async def forward(self, peer_id: str, step: StepMessage, timeout: float) -> StepOutput:
        return await request_forward(self.p2p, _peer(peer_id), step, timeout=timeout)

    async def shutdown(self) -> None:
        try:
            await self.p2p.shutdown()
        finally:
            await asyncio.to_thread(self.dht.shutdown)


def _peer(peer_id: str) -> PeerID:
    try:
        return PeerID.from_base58(peer_id)
    except ValueError:
        raise NodeUnavailable(f"{peer_id[:60]!r} is not a peer id", peer_id) from None
