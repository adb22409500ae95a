"""The model side of a node, shared with the client (which runs the head and, locally, the
reference): checkpoints, digests, spans and the family adapters.

- ``families/``   one small adapter per model family (BLOOM, Llama): build and run blocks
- ``checkpoint``  a Hugging Face checkpoint read tensor by tensor (single file or sharded)
- ``manifest``    model, block and span digests (``corolla-manifest.json``)
- ``span``        blocks [start, end) loaded and run with a KV cache; sub-spans
- ``quant``       int8 / NF4 quantization of a span's linear layers (bitsandbytes, CPU)
- ``tiny``        deterministic tiny checkpoints and an offline byte-level tokenizer
"""

__all__: list[str] = []
