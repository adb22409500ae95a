"""Where an auditor reads a ledger from: its HTTP API, or its database file directly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from corolla.errors import InvalidInput, LedgerError
from corolla.ledger.api.client import LedgerClient
from corolla.ledger.api.models import Account, b64decode, from_hex
from corolla.ledger.entries import RawEntry, RawOperation
from corolla.ledger.reader import LedgerReader, SqlTree
from corolla.verify.checkpoints import Checkpoint
from corolla.verify.merkle import consistency_proof

__all__ = ["DbSource", "HttpSource", "LogSource", "RawPage"]

PAGE = 1000


@dataclass(frozen=True, slots=True)
class RawPage:
    """A page of the log as stored: entries (payloads as canonical bytes, undecoded), the
    ledger's leaf hash of each, and the operations behind them."""

    entries: list[RawEntry]
    leaf_hashes: list[bytes]
    operations: list[RawOperation]


class LogSource(Protocol):
    """What the auditor needs from a ledger."""

    name: str

    def checkpoint(self) -> Checkpoint:
        """The latest signed checkpoint (signature not yet checked)."""
        ...

    def pages(self, size: int) -> Iterator[RawPage]:
        """Entries ``0 .. size - 1`` in pages, with the ledger's leaf hashes and operations."""
        ...

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """The ledger's proof that tree ``first`` is a prefix of tree ``second``."""
        ...

    def accounts(self) -> list[Account]:
        """Every account with the balance and reputation the ledger has cached."""
        ...

    def close(self) -> None: ...


class HttpSource:
    """A ledger served over HTTP (``corolla ledger audit --url``)."""

    def __init__(self, url: str) -> None:
        self.name = url
        self._client = LedgerClient(url)

    def checkpoint(self) -> Checkpoint:
        return self._client.checkpoint()

    def pages(self, size: int) -> Iterator[RawPage]:
        start = 0
        while start < size:
            data = self._client.raw_entries(start, min(PAGE, size - start))
            try:
                page = _raw_page(data)
            except (KeyError, TypeError, ValueError, InvalidInput) as error:
                raise LedgerError(f"the ledger sent a malformed page of entries: {error}") from None
            if not page.entries:
                return
            yield page
            start = page.entries[-1][0] + 1

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        return self._client.consistency_proof(first, second)

    def accounts(self) -> list[Account]:
        result: list[Account] = []
        after = b""
        while True:
            page = self._client.accounts(after, PAGE)
            result.extend(page)
            if len(page) < PAGE:
                return result
            after = page[-1].key

    def close(self) -> None:
        self._client.close()


class DbSource:
    """A ledger database file read directly (``corolla ledger audit --db``), in one snapshot."""

    def __init__(self, path: str | Path) -> None:
        self.name = str(path)
        self._reader = LedgerReader.open(path)
        self._reader.conn.execute("BEGIN")

    def checkpoint(self) -> Checkpoint:
        checkpoint = self._reader.latest_checkpoint()
        if checkpoint is None:
            raise LedgerError(f"{self.name} holds no signed checkpoint")
        return checkpoint

    def pages(self, size: int) -> Iterator[RawPage]:
        start = 0
        while start < size:
            rows = self._reader.raw_entries(start, min(PAGE, size - start))
            if not rows:
                return
            entries = [row[:11] for row in rows]
            operations = self._reader.raw_operations(rows[0][6], rows[-1][6])
            yield RawPage(entries, [row[11] for row in rows], operations)  # type: ignore[arg-type]
            start = rows[-1][0] + 1

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        return consistency_proof(SqlTree(self._reader.conn), first, second)

    def accounts(self) -> list[Account]:
        return self._reader.accounts(b"", 1 << 62)

    def close(self) -> None:
        self._reader.conn.execute("COMMIT")
        self._reader.close()


def _raw_page(data: dict[str, Any]) -> RawPage:
    """A page of ``GET /v1/entries`` in raw form (the payload stays canonical bytes)."""
    entries: list[RawEntry] = []
    leaves = []
    for item in data["entries"]:
        entries.append(
            (
                _int(item["seq"]),
                str(item["kind"]),
                from_hex(item["account"]),
                _int(item["amount"]),
                from_hex(item["ref"]),
                b64decode(item["payload"]),
                _int(item["op"]),
                from_hex(item["op_digest"]),
                from_hex(item["author"]),
                from_hex(item["author_signature"]),
                _int(item["time"]),
            )
        )
        leaves.append(from_hex(item["leaf_hash"]))
    operations: list[RawOperation] = [
        (
            _int(item["op"]),
            from_hex(item["author"]),
            from_hex(item["nonce"]),
            _int(item["timestamp"]),
            str(item["action"]),
            str(item["body"]).encode(),
            from_hex(item["signature"]),
            _int(item["time"]),
        )
        for item in data["operations"]
    ]
    return RawPage(entries, leaves, operations)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"expected an integer, got {type(value).__name__}")
    return value
