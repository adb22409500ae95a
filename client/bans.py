"""Peers the client stopped trusting for a while, with exponential backoff per repeat offence."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["BanList"]


@dataclass
class _Ban:
    strikes: int
    until: float
    reason: str


@dataclass
class BanList:
    base_seconds: float = 15.0
    max_seconds: float = 600.0
    clock: Callable[[], float] = time.monotonic
    _bans: dict[str, _Ban] = field(default_factory=dict)

    def ban(self, peer_id: str, reason: str) -> float:
        """Ban `peer_id`; each repeat doubles the ban, up to max_seconds. Returns its length."""
        strikes = self._bans[peer_id].strikes + 1 if peer_id in self._bans else 1
        seconds = min(self.max_seconds, self.base_seconds * 2 ** (strikes - 1))
        self._bans[peer_id] = _Ban(strikes, self.clock() + seconds, reason)
        return seconds

    def is_banned(self, peer_id: str) -> bool:
        ban = self._bans.get(peer_id)
        return ban is not None and ban.until > self.clock()

    def reason(self, peer_id: str) -> str | None:
        return self._bans[peer_id].reason if self.is_banned(peer_id) else None
