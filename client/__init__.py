"""The client side: everything a user runs to get text out of the swarm.

- ``head``        the client's tensors (embeddings, final norm, LM head) and tokenizer
- ``generation``  the generation loop (greedy, sampling, streaming, rewinds) over any backbone
- ``local``       all blocks in this process: the reference backbone
- ``routing``     Dijkstra over block boundaries
- ``swarm``       the DHT view, round trips and bans (``ClientConfig``)
- ``session``     an inference session through the swarm: receipts checked, failover
- ``spotcheck``   background recomputation on a second peer, third opinions, evidence
- ``remote``, ``model``  the synchronous face and ``DistributedModelForCausalLM``
- ``reporting``   work, attestations and evidence reported to the ledger
- ``priority``    tickets and trusted routes for ``--priority high``
- ``cli``         ``corolla generate``
"""

__all__: list[str] = []
