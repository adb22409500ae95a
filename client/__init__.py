"""The client side: everything a user runs to get text out of the swarm.

The public names are exported here; the modules behind them:

- ``model``       ``DistributedModelForCausalLM``: load the client side, join, generate
- ``generation``  the generation loop (greedy, sampling, streaming, rewinds) over any backbone
- ``head``        the client's tensors (embeddings, final norm, LM head) and tokenizer
- ``local``       all blocks in this process: the reference backbone
- ``swarm``       ``ClientConfig``; the DHT view, round trips, bans, routes
- ``transport``   the seam to the network (hivemind by default): streams, records, pings
- ``routing``     Dijkstra over block boundaries, with preferred peers
- ``session``     an inference session through the swarm: receipts checked, failover, rewinds
- ``session_log`` what a session did: verified work, checks, disputes, rewinds, failovers
- ``spotcheck``   checks v2: an assigned verifier recomputes and signs its verdict
- ``verifier_choice`` who checks: the ledger beacon's assignment, or the client's own draw
- ``check_streams`` check sessions on verifiers: incremental check steps, answers checked
- ``check_book``  a session's checks, rulings, rewinds and unverified tokens
- ``head_rule``   where a span ends at the head: the recomputation's token against the user's
- ``disputes``    failed checks go to the ledger's referee; its ruling decides
- ``check_ledger`` what checks need from the ledger (the seam), thresholds and honest floors
- ``node_work``   one node's session: its signed steps and how far they are verified
- ``remote``      the synchronous face of a swarm session (``RemoteBackbone``)
- ``signer``      who signs the client's requests (its identity, or a benchmark's stand-in)
- ``reporting``   work, attestations and evidence reported to the ledger
- ``priority``    tickets and trusted routes for ``--priority high``
- ``cli``         ``corolla generate``: ``generate_options`` (the form), ``generate_runner``,
  ``generate_printer``
"""

from corolla.client.generation import (
    GenerationConfig,
    GenerationResult,
    TokenRange,
    UnverifiedText,
    generate,
    generate_result,
)
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig

__all__ = [
    "ClientConfig",
    "DistributedModelForCausalLM",
    "GenerationConfig",
    "GenerationResult",
    "LocalBackbone",
    "SpotCheckConfig",
    "TokenRange",
    "UnverifiedText",
    "generate",
    "generate_result",
    "load_head",
]
