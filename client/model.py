"""The distributed model, in the style of transformers and Petals.

    model = DistributedModelForCausalLM.from_pretrained("models/tiny-bloom", initial_peers=[...])
    ids = model.tokenizer("A prompt", return_tensors="pt").input_ids
    new_ids = model.generate(ids, GenerationConfig(max_new_tokens=20))
    result = model.generate_result(ids, GenerationConfig(max_new_tokens=20))
    result.tokens, result.unverified  # the tokens, and which of them no check covered
    with model.inference_session(batch_size=1, max_length=64) as session:
        hidden = session.step(model.head.embed(ids))

The client loads only the embeddings, final norm and LM head; every block runs in the swarm.
With ``ledger=URL`` the ledger's beacon assigns the spot-checks' verifiers and its referee
judges their disputes; without one the client draws verifiers itself, which protects the text
and credits nothing. ``require_checks=True`` makes generation raise
:class:`~corolla.client.generation.UnverifiedText` rather than return tokens no check covered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from corolla.client.check_ledger import CheckRules, read_calibrations
from corolla.client.generation import GenerationConfig, GenerationResult, generate_result
from corolla.client.head import ClientHead, load_head
from corolla.client.remote import RemoteBackbone, RemoteSession
from corolla.client.runtime import BackgroundLoop
from corolla.client.session_log import WorkRecord
from corolla.client.signer import Signer
from corolla.client.spotcheck import SpotCheckConfig
from corolla.client.swarm import ClientConfig, Swarm
from corolla.errors import InvalidInput
from corolla.ledger.api.client import AsyncLedgerClient
from corolla.verify.identity import Identity, load_or_create_identity

__all__ = ["DEFAULT_CHECKS", "DistributedModelForCausalLM"]

DEFAULT_CHECKS = SpotCheckConfig()


class DistributedModelForCausalLM:
    def __init__(
        self,
        head: ClientHead,
        backbone: RemoteBackbone,
        loop: BackgroundLoop,
        ledger: AsyncLedgerClient | None = None,
    ) -> None:
        self.head = head
        self.backbone = backbone
        self._loop = loop
        self._ledger = ledger

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        initial_peers: Sequence[str] = (),
        config: ClientConfig | None = None,
        checks: SpotCheckConfig | None = DEFAULT_CHECKS,
        signer: Signer | None = None,
        ledger: str | None = None,
    ) -> DistributedModelForCausalLM:
        """Load the client side of `model_dir` and join the swarm through `initial_peers`.

        `checks` sets the spot-checks (5 % of steps, and every node once per session, by
        default); None switches them off. `signer` signs the client's requests instead of the
        identity in `config.identity` (created there if missing). `ledger` is the URL of the
        ledger that assigns verifiers and judges disputes (it needs the client's identity).
        """
        config = config or ClientConfig(initial_peers=tuple(initial_peers))
        head = load_head(model_dir)
        identity = signer if signer is not None else load_or_create_identity(config.identity)
        ledger_client = None
        if ledger is not None and checks is not None:
            if not isinstance(identity, Identity):
                raise InvalidInput("checks judged by a ledger need the client's own identity")
            ledger_client = AsyncLedgerClient(ledger, identity)
        rules = CheckRules(head.model_digest, read_calibrations(Path(model_dir), head.model_digest))
        loop = BackgroundLoop()
        try:
            swarm = loop.run(Swarm.connect(config), timeout=config.connect_timeout + 10)
        except BaseException:
            loop.close()
            raise
        backbone = RemoteBackbone(
            swarm, head.manifest, identity, loop, checks, ledger_client, rules, head.logits
        )
        return cls(head, backbone, loop, ledger_client)

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.head.tokenizer

    def generate(
        self,
        input_ids: torch.Tensor,
        config: GenerationConfig | None = None,
        on_tokens: Callable[[torch.Tensor], None] | None = None,
        on_rewind: Callable[[int], None] | None = None,
        require_checks: bool = False,
    ) -> torch.Tensor:
        """New token ids [batch, new] after input_ids [batch, prompt] (see generation.generate);
        with `require_checks`, :class:`UnverifiedText` instead of tokens no check covered."""
        return self.generate_result(
            input_ids, config, on_tokens, on_rewind, require_checks=require_checks
        ).tokens

    def generate_result(
        self,
        input_ids: torch.Tensor,
        config: GenerationConfig | None = None,
        on_tokens: Callable[[torch.Tensor], None] | None = None,
        on_rewind: Callable[[int], None] | None = None,
        require_checks: bool = False,
    ) -> GenerationResult:
        """The new tokens and the ranges of them whose steps went unchecked (and why)."""
        return generate_result(
            self.head,
            self.backbone,
            input_ids,
            config or GenerationConfig(),
            on_tokens,
            on_rewind,
            require_checks,
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
        return list(session.log.work) if session is not None else []

    def close(self) -> None:
        try:
            if self._ledger is not None:
                self._loop.run(self._ledger.aclose(), timeout=30)
            self._loop.run(self.backbone.swarm.shutdown(), timeout=30)
        finally:
            self._loop.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
