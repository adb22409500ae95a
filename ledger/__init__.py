"""The Bloom points ledger: an append-only, Merkle-hashed, signed and auditable log over SQLite.

Map of the package (read in this order):

- :mod:`corolla.ledger.config`      the accounting rules (fixed in the genesis entry) and limits
- :mod:`corolla.ledger.api.envelope`    the signed envelope of every write (author, nonce, time)
- :mod:`corolla.ledger.entries`     log entries (Merkle leaves) and the operations behind them
- :mod:`corolla.verify.tickets`     priority tickets signed by the ledger (pure; nodes use it)
- :mod:`corolla.verify.fast_encoding`   a faster path to the canonical encoding (bodies, payloads)
- :mod:`corolla.verify.fast_records`     fast reading of signed step records in their wire form
- :mod:`corolla.ledger.rules`       what counts as verified work (checked by trusted verifiers),
  no double credit, reputation
- :mod:`corolla.ledger.reports`     a client's report: pairs and spot-check attestations
- :mod:`corolla.ledger.fraud`    judging fraud evidence (referee, or two agreeing verifiers)
- :mod:`corolla.ledger.fraud`    examining fraud evidence (torch; imported only when needed)
- :mod:`corolla.node.referee`     the operator's referee: recomputes an accused span
- :mod:`corolla.ledger.state`       the derived state (balances, coverage, tickets) protocol, and
  its in-memory form the auditor rebuilds
- :mod:`corolla.ledger.fraud`     what evidence and slashes append to the log
- :mod:`corolla.ledger.operations`  what each signed request does: prepare, then apply
- :mod:`corolla.ledger.schema`      SQLite tables and connection settings (WAL, synchronous=FULL)
- :mod:`corolla.ledger.store`       the writer: one operation, one transaction; signed checkpoints
- :mod:`corolla.ledger.reader`      read-only queries, the stored Merkle tree, proofs
- :mod:`corolla.ledger.bodies`  request bodies of the HTTP API (its OpenAPI schema)
- :mod:`corolla.ledger.app`         the FastAPI service; :mod:`corolla.ledger.server` runs it
- :mod:`corolla.ledger.api.client`      the httpx client (async, and a sync face)
- :mod:`corolla.ledger.sources`     where an auditor reads a ledger from (HTTP or a file)
- :mod:`corolla.ledger.audit_checks`    the auditor's check of each operation, on every core
- :mod:`corolla.ledger.audit`       the auditor
- :mod:`corolla.ledger.cli`         ``corolla ledger serve|audit|balance|history|top|slash``

The Merkle tree and checkpoint functions clients need live in :mod:`corolla.verify.merkle` and
:mod:`corolla.verify.checkpoints`. Design notes and measured figures: ``docs/ledger.md``.
"""

__all__: list[str] = []
