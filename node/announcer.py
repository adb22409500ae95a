"""The node's signed record in the DHT, stored under every block it serves.

The record is built from what the service really serves (the loaded span's digest, dtype and
quantization, the measured throughput, the cache room left), signed with the node's Ed25519 key
and stored with an expiry of twice the refresh period, never earlier than the last one stored
(the DHT keeps the entry with the latest expiry per subkey).
"""

from __future__ import annotations

import logging

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

from corolla.node.protocol.records import ServerRecord, announce, sign_record
from corolla.node.service import NodeService
from corolla.verify.identity import Identity
from corolla.version import __version__

__all__ = ["Announcer"]

logger = logging.getLogger("corolla.node")


class Announcer:
    """Signs and stores ``service``'s record in ``dht``; remembers the last expiry it stored."""

    def __init__(self, dht: DHT, identity: Identity, service: NodeService, period: float):
        self.dht = dht
        self.identity = identity
        self.service = service
        self.period = period
        self.peer_id = dht.peer_id.to_base58()
        self.last_expiry = 0.0

    def record(self, state: str) -> ServerRecord:
        """The record to announce now in ``state`` (unsigned)."""
        expires_at = max(get_dht_time() + 2 * self.period, self.last_expiry + 0.01)
        service, span = self.service, self.service.span
        return ServerRecord(
            peer_id=self.peer_id,
            public_key=self.identity.public_key,
            model_digest=span.model_digest,
            span_digest=span.digest,
            start=span.start,
            end=span.end,
            throughput=service.throughput,
            cache_tokens_free=max(service.sessions.free_tokens, 0),
            quant=span.quant,
            dtype=service.dtype_name,
            state=state,
            version=__version__,
            expires_at=expires_at,
        )

    async def store(self, state: str) -> bool:
        """Sign and store the record; False (and a warning) if some block's store failed."""
        record = self.record(state)
        self.last_expiry = record.expires_at
        stored = await announce(self.dht, sign_record(self.identity, record))
        if not stored:
            logger.warning("could not store the %s record in the DHT", state)
        return stored
