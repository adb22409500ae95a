"""Corolla: decentralized LLM inference with signed activations and a points ledger.

The names a user needs are exported here (imported on first use, so ``import corolla.verify``
stays light and loads neither torch nor hivemind)::

    from corolla import DistributedModelForCausalLM, GenerationConfig, ClientConfig

    with DistributedModelForCausalLM.from_pretrained(path, initial_peers=peers) as model:
        new_ids = model.generate(ids, GenerationConfig(max_new_tokens=20))

Map of the package (each folder at the repository root is a subpackage):

- ``corolla.verify``      identities, canonical encoding, digests, receipts, tickets, Merkle proofs
- ``corolla.node``        model spans (``node.model``), the wire protocol (``node.protocol``),
  KV-cache sessions, the node service and process, the referee
- ``corolla.client``      routing, inference sessions, generation, spot-checks
- ``corolla.ledger``      the append-only points log, its rules, HTTP service and audit; its HTTP
  face (``ledger.api``) is what nodes and clients import
- ``corolla.simulations`` adversaries, simulations of malicious nodes, the live process harness
- ``corolla.errors``      the one exception tree every part raises from
- ``corolla.version``     the package and wire-protocol versions
- ``corolla.cli``         the ``corolla`` command, assembled from the packages' sub-apps
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from corolla.errors import (
    BadReceipt,
    BadSignature,
    CheckpointError,
    CorollaError,
    InvalidInput,
    LedgerError,
    LedgerRefused,
    NodeBusy,
    NodeError,
    NodeUnavailable,
    RouteUnavailable,
    UnverifiedText,
    VerificationError,
)
from corolla.version import PROTOCOL_VERSION, __version__

if TYPE_CHECKING:
    from corolla.client.generation import GenerationConfig
    from corolla.client.model import DistributedModelForCausalLM
    from corolla.client.swarm import ClientConfig
    from corolla.ledger.api.client import AsyncLedgerClient, LedgerClient
    from corolla.ledger.api.client import ClientConfig as LedgerClientConfig
    from corolla.node.server import NodeConfig, run_node
    from corolla.verify.identity import Identity

__all__ = [
    "PROTOCOL_VERSION",
    "AsyncLedgerClient",
    "BadReceipt",
    "BadSignature",
    "CheckpointError",
    "ClientConfig",
    "CorollaError",
    "DistributedModelForCausalLM",
    "GenerationConfig",
    "Identity",
    "InvalidInput",
    "LedgerClient",
    "LedgerClientConfig",
    "LedgerError",
    "LedgerRefused",
    "NodeBusy",
    "NodeConfig",
    "NodeError",
    "NodeUnavailable",
    "RouteUnavailable",
    "UnverifiedText",
    "VerificationError",
    "__version__",
    "run_node",
]

_LAZY: dict[str, tuple[str, str]] = {
    "DistributedModelForCausalLM": ("corolla.client.model", "DistributedModelForCausalLM"),
    "GenerationConfig": ("corolla.client.generation", "GenerationConfig"),
    "ClientConfig": ("corolla.client.swarm", "ClientConfig"),
    "LedgerClient": ("corolla.ledger.api.client", "LedgerClient"),
    "AsyncLedgerClient": ("corolla.ledger.api.client", "AsyncLedgerClient"),
    "LedgerClientConfig": ("corolla.ledger.api.client", "ClientConfig"),
    "NodeConfig": ("corolla.node.server", "NodeConfig"),
    "run_node": ("corolla.node.server", "run_node"),
    "Identity": ("corolla.verify.identity", "Identity"),
}


def __getattr__(name: str) -> Any:
    """The exported names that need torch or hivemind, imported when first asked for."""
    if name not in _LAZY:
        raise AttributeError(f"module 'corolla' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
