"""Corolla: decentralized LLM inference with signed activations and a points ledger.

Map of the package (each folder at the repository root is a subpackage):

- ``corolla.verify``      identities, canonical encoding, digests, receipts, Merkle proofs
- ``corolla.node``        model families, span loading, KV-cache sessions, the node service
- ``corolla.client``      routing, inference sessions, generation, spot-checks, ledger client
- ``corolla.ledger``      the append-only points log, its rules, HTTP service and audit
- ``corolla.simulations`` adversaries and simulations of malicious nodes
- ``corolla.errors``      the one exception tree every part raises from
- ``corolla.cli``         the ``corolla`` command, assembled from the packages' sub-apps
"""

from corolla.errors import CorollaError

__version__ = "0.1.0"
PROTOCOL_VERSION = 1

__all__ = ["PROTOCOL_VERSION", "CorollaError", "__version__"]
