"""The node side: model spans and serving them to the swarm.

- ``families/``     one small adapter per model family (BLOOM, Llama): build and run blocks
- ``checkpoint``    a Hugging Face checkpoint read tensor by tensor (single file or sharded)
- ``manifest``      model, block and span digests (``corolla-manifest.json``)
- ``span``          blocks [start, end) loaded and run with a KV cache; sub-spans
- ``quant``         int8 / NF4 quantization of a span's linear layers (bitsandbytes, CPU)
- ``tiny``          deterministic tiny checkpoints and an offline byte-level tokenizer
- ``wire``, ``wire_client``  the RPC messages, tensor chunking, and the raw client end
- ``records``       signed DHT server records: build, validate, announce, fetch
- ``sessions``      per-session KV caches within a token budget, idempotent steps
- ``scheduler``     the priority queue every computation goes through
- ``tickets``       the ticket book: which priority tickets are honoured, their use, work to redeem
- ``settlement``    redeeming ticketed work at the ledger, every period and at shutdown
- ``behaviour``     the seam an adversary replaces (honest by default)
- ``service``       the RPC servicer: inference streams, one-shot forwards, info
- ``server``        the ``corolla node run`` process: DHT, announcements, clean withdrawal
- ``points``        the live display of a node's ledger balance
- ``launcher``      start and always stop real node processes (demo, benchmarks, tests)
- ``cli``, ``run_cli``  ``corolla model ...`` and ``corolla node run``
"""

__all__: list[str] = []
