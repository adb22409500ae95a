"""Who signs a client's requests: any object with an Ed25519 public key and a ``sign`` method.

Normally the client's :class:`~corolla.verify.identity.Identity`, loaded from its key file. A
benchmark may hand ``DistributedModelForCausalLM.from_pretrained(signer=...)`` a stand-in that
signs nothing (``benchmarks/unsigned.py``); honest nodes refuse such requests, and nothing in
the client switches to one by itself.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["Signer"]


class Signer(Protocol):
    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key that requests name as their client key."""
        ...

    def sign(self, message: bytes) -> bytes:
        """A 64-byte signature of ``message``."""
        ...
