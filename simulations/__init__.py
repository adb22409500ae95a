"""Misbehaving nodes and simulations of them.

- ``adversaries``  node behaviours that cheat (noise, subtle, lazy, selective, wrong model, wrong
                   quantization, and the wrong-key / bad-digest liars that receipts catch), by
                   name through ``make_behaviour(name, AdversaryOptions(...))``;
- ``node_cli``     ``corolla simulate node --adversary NAME [...]``: a real node process running
                   one of them (same options as ``corolla node run``).
"""

__all__: list[str] = []
