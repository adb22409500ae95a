"""Shared helpers of the ledger tests: signed step pairs, signed requests, a live server.

Owned by the ledger's tests (imported as ``ledger_fixtures``; pytest puts ``tests/`` on the
path). The server helper starts ``python -m corolla.ledger.server`` on a free loopback port,
waits for it with a bounded loop, and always stops it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from corolla.verify import GENESIS_CHAIN, Identity, make_receipt, sign_request
from corolla.verify.receipts import Receipt, StepRequest

__all__ = [
    "LedgerServer",
    "free_port",
    "make_pairs",
    "pair_dicts",
    "running_server",
    "seed_identity",
]

MODEL = bytes.fromhex("11" * 32)
SPAN = bytes.fromhex("22" * 32)


def seed_identity(name: str) -> Identity:
    """A deterministic identity per name (readable tests)."""
    return Identity.from_seed(name.encode().ljust(32, b".")[:32])


def make_pairs(
    client: Identity,
    node: Identity,
    *,
    session: bytes | None = None,
    steps: int = 3,
    start: int = 0,
    end: int = 4,
    first_step: int = 0,
    prefill: int = 5,
    ticket: bytes | None = None,
) -> list[tuple[StepRequest, Receipt]]:
    """A node-session's consecutive steps: a prefill of ``prefill`` tokens, then one token
    per step, each request signed by the client and each receipt by the node (chained)."""
    session = session or secrets.token_bytes(16)
    pairs = []
    chain = GENESIS_CHAIN
    position = 0 if first_step == 0 else prefill + first_step - 1
    for step in range(first_step, first_step + steps):
        tokens = prefill if step == 0 else 1
        request = sign_request(
            client,
            protocol_version=1,
            model_digest=MODEL,
            span_digest=SPAN,
            start=start,
            end=end,
            session_id=session,
            step=step,
            position=position,
            tokens=tokens,
            input_digest=secrets.token_bytes(32),
            ticket_digest=ticket,
        )
        receipt = make_receipt(node, request, secrets.token_bytes(32), chain)
        chain = receipt.chain_digest
        position += tokens
        pairs.append((request, receipt))
    return pairs


def pair_dicts(pairs: list[tuple[StepRequest, Receipt]]) -> list[dict[str, Any]]:
    """The JSON form of pairs, as the ledger's API takes them."""
    return [{"request": r.to_dict(), "receipt": c.to_dict()} for r, c in pairs]


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LedgerServer:
    """A ledger server process on 127.0.0.1."""

    def __init__(self, db: Path, key: Path, *, extra: tuple[str, ...] = ()) -> None:
        self.db = db
        self.key = key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = db.with_suffix(f".{self.port}.log")
        command = [
            sys.executable,
            "-m",
            "corolla.ledger.server",
            "--db",
            str(db),
            "--key",
            str(key),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *extra,
        ]
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=self._log_file, stderr=subprocess.STDOUT, env={**os.environ}
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ledger server exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/info", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"ledger server not ready after {timeout} s")

    def kill(self) -> None:
        """SIGKILL: no chance to flush or clean up."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self._log_file.close()

    def stop(self) -> None:
        """Terminate gracefully, then kill if it does not stop."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log_file.close()


@contextlib.contextmanager
def running_server(db: Path, key: Path, *, extra: tuple[str, ...] = ()) -> Iterator[LedgerServer]:
    """A ledger server for the duration of the block."""
    server = LedgerServer(db, key, extra=extra)
    try:
        yield server
    finally:
        server.stop()
