"""The node side: model spans and serving them to the swarm.

- ``model/``        the model side shared with clients: checkpoints (published layouts, hub
  ids, GGUF import, fetching packaged models), manifests, spans, quantization, family adapters
- ``protocol/``     the wire protocol clients import: messages, tensors, framing, the raw client
  end, signed DHT records, local-only libp2p options
- ``sessions``      per-session KV caches within a token budget, idempotent steps
- ``scheduler``     the priority queue every computation goes through
- ``step_checks``   the checks every step passes before it is computed (pure functions)
- ``admission``     which priority a step runs at and what its ticket is charged (pure)
- ``ticket_book``   which priority tickets are honoured, their use, the work to redeem
- ``settlement``    redeeming ticketed work at the ledger, every period and at shutdown
- ``behaviour``     the seam an adversary replaces (honest by default)
- ``verifier``      the node as a verifier: check steps, comparisons, signed verdicts
- ``referee``       a referee's recomputation of disputed work (the ledger is handed one)
- ``service``       the RPC servicer: inference streams, check steps, one-shot forwards, info
- ``stream_ends``   reading requests off a raw stream and lingering before it closes
- ``server``        the ``corolla node run`` process: pick a span, load, announce, serve, stop
- ``announcer``     the node's signed DHT record, refreshed and withdrawn
- ``dht_process``   the node's DHT process (local-only unless the node is public)
- ``lifeline``      helpers (DHT process, libp2p daemon) die with the node's main process
- ``ledger_trust``  whose tickets the node honours (the ledger it trusts)
- ``balance_watch`` the live display of a node's ledger balance
- ``cli``, ``run_cli``  ``corolla model ...`` and ``corolla node run``
"""

__all__: list[str] = []
