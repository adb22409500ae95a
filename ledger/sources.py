"""Where an auditor reads a ledger from: its HTTP API, or its database file directly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from corolla.errors import LedgerError
from corolla.ledger.client import EntryPage, LedgerClient
from corolla.ledger.reader import LedgerReader, SqlTree
from corolla.ledger.state import Account
from corolla.verify.checkpoints import Checkpoint
from corolla.verify.merkle import consistency_proof

__all__ = ["DbSource", "HttpSource", "LogSource"]

PAGE = 1000


class LogSource(Protocol):
    """What the auditor needs from a ledger."""

    name: str

    def checkpoint(self) -> Checkpoint:
        """The latest signed checkpoint (signature not yet checked)."""
        ...

    def pages(self, size: int) -> Iterator[EntryPage]:
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

    def pages(self, size: int) -> Iterator[EntryPage]:
        start = 0
        while start < size:
            page = self._client.entries(start, min(PAGE, size - start))
            if not page.entries:
                return
            yield page
            start = page.entries[-1].seq + 1

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

    def pages(self, size: int) -> Iterator[EntryPage]:
        start = 0
        while start < size:
            entries = self._reader.entries(start, min(PAGE, size - start))
            if not entries:
                return
            leaves = dict(self._reader.leaf_hashes(start, min(PAGE, size - start)))
            operations = self._reader.operations({entry.op for entry in entries})
            yield EntryPage(entries, leaves, operations)
            start = entries[-1].seq + 1

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        return consistency_proof(SqlTree(self._reader.conn), first, second)

    def accounts(self) -> list[Account]:
        return self._reader.accounts(b"", 1 << 62)

    def close(self) -> None:
        self._reader.conn.execute("COMMIT")
        self._reader.close()
