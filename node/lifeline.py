"""A node's helper processes die with it, however it ends.

A node is several processes: the main one (``corolla node run``), the DHT process hivemind forks
from it, and the libp2p daemon (``p2pd``) the DHT process starts. A clean stop shuts them down in
order; a crash of the main process (SIGKILL, the OOM killer) used to leave the other two running,
as orphans holding the node's port and peer id. Each kind of child gets its own tie:

- a forked child (the DHT process) calls :func:`die_with_parent` first thing: the kernel sends it
  SIGKILL the moment the main process ends (Linux ``PR_SET_PDEATHSIG``);
- an executed child cannot be asked that (hivemind starts the daemon with no hook to run in it),
  so the DHT process puts a :class:`Lifeline`'s mark in its environment, which the daemon
  inherits, and the lifeline's guard (a small process of its own, this file run as a script)
  waits for the main process to end and stops every process carrying the mark: SIGTERM, then
  SIGKILL after a grace period.

The guard ignores SIGINT, SIGTERM and SIGHUP (a Ctrl-C in a terminal reaches the whole process
group; the guard stays to clean up after the main process, then exits). It also exits, after the
same sweep, when the main process releases it at the end of a clean stop. Only this file's
standard-library imports run in the guard.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

__all__ = ["MARK_VARIABLE", "Lifeline", "die_with_parent", "marked_processes"]

MARK_VARIABLE = "COROLLA_NODE_MARK"
"""Environment variable whose value ties a process to one running node (see the module doc)."""

_PR_SET_PDEATHSIG = 1
_GRACE_SECONDS = 2.0
"""How long the guard waits after SIGTERM before it sends SIGKILL."""
_RELEASE_SECONDS = 5.0


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent ends; die now if it already has.

    Call it first thing in a child forked from ``parent_pid``. (The signal follows the parent
    *thread* that forked: fork from a thread that lives as long as the process.) Linux only; a
    no-op elsewhere.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent ended before the signal was set
        os.kill(os.getpid(), signal.SIGKILL)


def marked_processes(mark: str) -> list[int]:
    """Pids of the processes (readable by us, other than this one) whose environment holds
    ``MARK_VARIABLE=mark``."""
    entry = f"{MARK_VARIABLE}={mark}".encode()
    found: list[int] = []
    try:
        names = os.listdir("/proc")
    except OSError:  # no procfs (not Linux): nothing to find
        return found
    for name in names:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as environ:
                variables = environ.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        if entry in variables and _running(int(name)):
            found.append(int(name))
    return found


class Lifeline:
    """The guard of one node: started on entry, released on a clean exit.

    ``mark`` is the value a child puts under :data:`MARK_VARIABLE` in its environment to be
    stopped with the node (the DHT process does, for its libp2p daemon).
    """

    def __init__(self) -> None:
        self.mark = os.urandom(12).hex()
        self._guard: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Lifeline:
        self._guard = subprocess.Popen(
            [sys.executable, "-I", "-S", str(Path(__file__)), str(os.getpid()), self.mark],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env={key: value for key, value in os.environ.items() if key != MARK_VARIABLE},
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def release(self, timeout: float = _RELEASE_SECONDS) -> None:
        """Let the guard sweep what is left of the node and exit; wait for it (bounded)."""
        guard, self._guard = self._guard, None
        if guard is None:
            return
        if guard.stdin is not None:
            guard.stdin.close()
        try:
            guard.wait(timeout)
        except subprocess.TimeoutExpired:
            guard.kill()
            guard.wait()


# --------------------------------------------------------------------------- the guard


def _running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (an orphan may wait for a reaper a while)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _wait_for_end(main_pid: int) -> None:
    """Return when the main process has ended, or closed our stdin (a release)."""
    try:
        pidfd: int | None = os.pidfd_open(main_pid)
    except (AttributeError, OSError):
        pidfd = None
    # We are its child: while our parent is main_pid, main_pid is alive (and the pidfd is its).
    if os.getppid() != main_pid:
        return
    watched = [sys.stdin.fileno()] + ([pidfd] if pidfd is not None else [])
    while True:
        ready, _, _ = select.select(watched, [], [], 0.5 if pidfd is None else None)
        if os.getppid() != main_pid or (pidfd is not None and pidfd in ready):
            return
        if sys.stdin.fileno() in ready and not os.read(sys.stdin.fileno(), 4096):
            return


def _stop(pids: list[int]) -> list[int]:
    """SIGTERM, then SIGKILL what is still running after the grace period."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + _GRACE_SECONDS
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if _running(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    return pids


def _sweep(mark: str) -> Iterator[int]:
    """Stop every marked process, twice over (a dying parent may have started one more)."""
    for _ in range(2):
        yield from _stop(marked_processes(mark))


def _guard(main_pid: int, mark: str) -> int:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    _wait_for_end(main_pid)
    crashed = os.getppid() != main_pid
    stopped = sorted(set(_sweep(mark)))
    if stopped:
        why = f"node process {main_pid} ended" if crashed else "node stopped"
        listed = ", ".join(map(str, stopped))
        print(f"corolla node: {why}; stopped its leftover process(es) {listed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(_guard(int(sys.argv[1]), sys.argv[2]))
