"""The distributed model, in the style of transformers and Petals.

    model = DistributedModelForCausalLM.from_pretrained("models/tiny-bloom", initial_peers=[...])
    ids = model.tokenizer("A prompt", return_tensors="pt").input_ids
    new_ids = model.generate(ids, GenerationConfig(max_new_tokens=20))
    with model.inference_session(batch_size=1, max_length=64) as session:
        hidden = session.step(model.head.embed(ids))

The client loads only the embeddings, final norm and LM head; every block runs in the swarm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import ClientHead, load_head
from corolla.client.remote import RemoteBackbone, RemoteSession
from corolla.client.runtime import BackgroundLoop
from corolla.client.session import WorkRecord
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig, Swarm
from corolla.verify.identity import load_or_create_identity

__all__ = ["DEFAULT_CHECKS", "DistributedModelForCausalLM"]

DEFAULT_CHECKS = SpotCheckConfig()


class DistributedModelForCausalLM:
    def __init__(self, head: ClientHead, backbone: RemoteBackbone, loop: BackgroundLoop) -> None:
        self.head = head
        self.backbone = backbone
        self._loop = loop

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        initial_peers: Sequence[str] = (),
        config: ClientConfig | None = None,
        checks: SpotCheckConfig | None = DEFAULT_CHECKS,
    ) -> DistributedModelForCausalLM:
        """Load the client side of `model_dir` and join the swarm through `initial_peers`.

        `checks` sets the spot-checks (5 % of steps, and every node once per session, by
        default); None switches them off.
        """
        config = config or ClientConfig(initial_peers=tuple(initial_peers))
        head = load_head(model_dir)
        identity = load_or_create_identity(config.identity)
        loop = BackgroundLoop()
        try:
            swarm = loop.run(Swarm.connect(config), timeout=config.connect_timeout + 10)
        except BaseException:
            loop.close()
            raise
        return cls(head, RemoteBackbone(swarm, head.manifest, identity, loop, checks), loop)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.head.tokenizer

    def generate(
        self,
        input_ids: torch.Tensor,
        config: GenerationConfig | None = None,
        on_tokens: Callable[[torch.Tensor], None] | None = None,
        on_rewind: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """New token ids [batch, new] after input_ids [batch, prompt] (see generation.generate)."""
        return generate(
            self.head, self.backbone, input_ids, config or GenerationConfig(), on_tokens, on_rewind
        )

    @contextmanager
    def inference_session(
        self, batch_size: int = 1, max_length: int | None = None
    ) -> Iterator[RemoteSession]:
        with self.backbone.inference_session(batch_size, max_length or self.head.max_length) as s:
            yield s

    @property
    def last_work(self) -> list[WorkRecord]:
        """The verified (request, receipt) pairs of the most recent session."""
        session = self.backbone.last_session
        return list(session.work) if session is not None else []

    def close(self) -> None:
        try:
            self._loop.run(self.backbone.swarm.shutdown(), timeout=30)
        finally:
            self._loop.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
