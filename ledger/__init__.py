"""The Bloom points ledger: an append-only, Merkle-hashed, signed and auditable log over SQLite.

Map of the package (read in this order):

- :mod:`corolla.ledger.config`      the accounting rules (fixed in the genesis entry) and limits
- :mod:`corolla.ledger.api`         the HTTP face nodes and clients import: envelope, models,
  report wire form, the wire forms of checks v2 (declarations, calibrations, dispute
  outcomes), client
- :mod:`corolla.ledger.entries`     log entries (Merkle leaves) and the operations behind them
- :mod:`corolla.ledger.rules`       what counts as verified work (a passed verdict of the assigned
  verifier), no double credit, reputation
- :mod:`corolla.ledger.reports`     checking a client's report: pairs, and each verifier's signed
  verdict with its recomputation and beacon (state-free)
- :mod:`corolla.ledger.checks`      whether a verdict counts against the state: the ledger's
  beacon, the assignment over the serving declarations, the threshold
- :mod:`corolla.ledger.crediting`   what a report appends: credit, and fees for new positions
- :mod:`corolla.ledger.declarations`    serving declarations and published calibrations
- :mod:`corolla.ledger.disputes`    disputes: checked, judged by the referee, logged, slashed
- :mod:`corolla.ledger.fraud`       examining fraud evidence (torch; imported only when needed),
  judging it (referee, or two agreeing verifiers), and what a verdict appends
- :mod:`corolla.ledger.state`       the derived state (balances, coverage, tickets, declarations,
  calibrations, paid positions) protocol and the one list of invariants every entry keeps
- :mod:`corolla.ledger.memory`      the in-memory state the auditor rebuilds
- :mod:`corolla.ledger.sql_state`   the same state in SQLite, inside the write transaction
- :mod:`corolla.ledger.operations`  what each signed request does: prepare, then apply
- :mod:`corolla.ledger.schema`      SQLite tables and connection settings (WAL, synchronous=FULL)
- :mod:`corolla.ledger.store`       the writer: one operation, one transaction; signed checkpoints
- :mod:`corolla.ledger.reader`      read-only queries, the stored Merkle tree, proofs
- :mod:`corolla.ledger.bodies`      request bodies of the HTTP API (its OpenAPI schema)
- :mod:`corolla.ledger.routes`      the HTTP routes, one router per resource (reads, proofs, writes)
- :mod:`corolla.ledger.check_routes`    the routes of checks v2 (beacon, serving, calibrations,
  disputes)
- :mod:`corolla.ledger.app`         the FastAPI app: the routers, a body limit, errors as 4xx JSON
- :mod:`corolla.ledger.server`      runs it (``ServeOptions`` -> ``ServeConfig`` -> uvicorn)
- :mod:`corolla.ledger.sources`     where an auditor reads a ledger from (HTTP or a file)
- :mod:`corolla.ledger.audit_checks`    the auditor's check of each operation, on every core
- :mod:`corolla.ledger.audit`       the auditor
- :mod:`corolla.ledger.views`       how the command shows entries and audit reports
- :mod:`corolla.ledger.cli`         ``corolla ledger serve|audit|balance|history|top|slash|
  publish-tolerance``

Signed bytes are read and encoded through :mod:`corolla.verify.fast` (the fast path of the one
canonical encoding) and signatures checked through :mod:`corolla.verify.identity`; priority
tickets are :mod:`corolla.verify.tickets`; the referee is the node's
(:mod:`corolla.node.referee`), handed to the server by the command root.

The Merkle tree and checkpoint functions clients need live in :mod:`corolla.verify.merkle` and
:mod:`corolla.verify.checkpoints`. Design notes and measured figures: ``docs/ledger.md``.
"""

__all__: list[str] = []
