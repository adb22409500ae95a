"""The node's wire protocol: the one part of the node that clients import.

- ``messages``  the RPC messages (open, step, reply, error, info), their kinds, handler names
- ``tensors``   how a message travels: strict tensor encoding, chunking into parts under
  hivemind's message cap, reassembly
- ``framing``   length-prefixed frames on a raw libp2p stream, with a bound
- ``stream``    the client's end: a persistent inference stream, one-shot forwards, ``info``
- ``records``   signed DHT server records: build, validate, announce, fetch
- ``p2p_options`` libp2p kept on the machine (no NAT mapping, AutoNAT or relays) unless public
"""

__all__: list[str] = []
