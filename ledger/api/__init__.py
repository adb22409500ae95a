"""The ledger's HTTP face: the one part of the ledger that nodes and clients import. It imports
none of the ledger's rules, state or store.

- ``envelope``  the signed envelope of every write (author, nonce, time)
- ``models``    value types the API returns (entries, operations, accounts) and their JSON
- ``reports``   the wire form of a client's report (pairs and the verifiers' signed verdicts)
- ``checks``    wire forms of checks v2: serving declarations, calibrations, dispute outcomes
- ``client``    the httpx client (async, and a sync face) with a swappable transport
"""

__all__: list[str] = []
