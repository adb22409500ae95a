"""The cryptographic layer everything else in Corolla trusts: pure functions, no network.

Map of the package (it imports nothing of Corolla's but :mod:`corolla.errors`):

- :mod:`corolla.verify.encoding`    canonical, strict binary encoding of a small data model, and
  domain-separated SHA-256 digests (``corolla/v1/<domain>``) of everything signed or hashed
- :mod:`corolla.verify.digests`     tensor digests (dtype, shape, bytes) and the per-session
  chain digest that pins every earlier step
- :mod:`corolla.verify.identity`    Ed25519 identities, owner-only key files, signature checks
- :mod:`corolla.verify.receipts`    the client's signed :class:`StepRequest`, the node's signed
  :class:`Receipt`, their checks, work units, JSON-lines files
- :mod:`corolla.verify.merkle`      RFC 6962 Merkle tree hashing and proofs (import by full path)
- :mod:`corolla.verify.checkpoints` signed Merkle tree checkpoints (import by full path)
- :mod:`corolla.verify.tickets`     priority tickets signed by the ledger (import by full path)
- :mod:`corolla.verify.fast`        the fast path of the canonical encoding (lean encoder, step
  records read from their wire form, direct digests; import by full path)
- :mod:`corolla.verify.tolerance`, :mod:`corolla.verify.evidence`, :mod:`corolla.verify.disputes`
  comparisons under measured tolerances, fraud evidence, and disputes a referee decides
- :mod:`corolla.verify.beacon`, :mod:`corolla.verify.assignment`, :mod:`corolla.verify.verdicts`
  the ledger's randomness beacon, who checks whom, and a verifier's signed verdict
- :mod:`corolla.verify.referee`     what a referee is (its finding, config and factory)

The names of the first four modules are re-exported here.
"""

from corolla.verify.digests import (
    DIGEST_SIZE,
    GENESIS_CHAIN,
    chain_digest,
    check_digest,
    tensor_digest,
)
from corolla.verify.encoding import (
    DOMAIN_PREFIX,
    MAX_DEPTH,
    MAX_ITEMS,
    canonical,
    decode,
    domain_digest,
    domain_message,
)
from corolla.verify.identity import (
    KEY_FILE_HEADER,
    PUBLIC_KEY_SIZE,
    SEED_SIZE,
    SIGNATURE_SIZE,
    Identity,
    load_identity,
    load_or_create_identity,
    peer_name_of,
    save_identity,
    verify_signature,
)
from corolla.verify.receipts import (
    SESSION_ID_SIZE,
    Receipt,
    StepRequest,
    make_receipt,
    read_receipts_jsonl,
    sign_request,
    verify_receipt,
    verify_request,
    work_units,
    write_receipts_jsonl,
)

__all__ = [
    "DIGEST_SIZE",
    "DOMAIN_PREFIX",
    "GENESIS_CHAIN",
    "KEY_FILE_HEADER",
    "MAX_DEPTH",
    "MAX_ITEMS",
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "SESSION_ID_SIZE",
    "SIGNATURE_SIZE",
    "Identity",
    "Receipt",
    "StepRequest",
    "canonical",
    "chain_digest",
    "check_digest",
    "decode",
    "domain_digest",
    "domain_message",
    "load_identity",
    "load_or_create_identity",
    "make_receipt",
    "peer_name_of",
    "read_receipts_jsonl",
    "save_identity",
    "sign_request",
    "tensor_digest",
    "verify_receipt",
    "verify_request",
    "verify_signature",
    "work_units",
    "write_receipts_jsonl",
]
