"""Start a real ledger server process on 127.0.0.1, wait until it answers, always stop it.

Used by `corolla demo`, the benchmarks and the tests (`tests/ledger_fixtures.py`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from corolla.errors import LedgerError

__all__ = ["LedgerProcess", "free_port"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LedgerProcess:
    """`python -m corolla.ledger_server` on a free loopback port; its output goes to a log."""

    def __init__(
        self,
        db: Path,
        key: Path,
        *,
        extra: Sequence[str] = (),
        ready_timeout: float = 60.0,
    ) -> None:
        self.db = db
        self.key = key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = db.with_suffix(f".{self.port}.log")
        command = [
            sys.executable, "-m", "corolla.ledger_server", "--db", str(db), "--key", str(key),
            "--host", "127.0.0.1", "--port", str(self.port), *extra,
        ]  # fmt: skip
        self._log_file = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ},
            start_new_session=True,
        )
        self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._log_file.close()
                raise LedgerError(f"the ledger server exited: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/v1/info", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.05)
        self.stop()
        raise LedgerError(f"the ledger server did not answer within {timeout:g} s")

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

    def __enter__(self) -> LedgerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
