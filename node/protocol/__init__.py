"""The node's wire protocol: the one part of the node that clients import.

- ``messages``  the RPC messages (open, step, reply, error, info), tensors and their strict
  encoding, chunking under hivemind's message cap
- ``framing``   length-prefixed frames on a raw libp2p stream, with a bound
- ``stream``    the client's end: a persistent inference stream, one-shot forwards, ``info``
- ``records``   signed DHT server records: build, validate, announce, fetch
"""

__all__: list[str] = []
