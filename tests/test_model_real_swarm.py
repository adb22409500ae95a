"""The trained model through a real two-node swarm: greedy chat generation equals local
generation token for token, also when the routed node of the second span is SIGKILLed in the
middle and a replacement rebuilds its cache by replay (issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.swarm import ClientConfig
from corolla.errors import CheckpointError
from corolla.node.model.chat import chat_input_ids, chat_messages
from corolla.node.model.fetch import fetch_model
from corolla.simulations.live import LocalSwarm

pytestmark = pytest.mark.real_model

QUESTION = "What is the capital of France?"
NEW_TOKENS = 10
GREEDY = GenerationConfig(max_new_tokens=NEW_TOKENS, stop_at_eos=False)


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return fetch_model("smollm2-135m")
    except CheckpointError as error:
        pytest.skip(f"the trained model cannot be fetched here: {error}")


def test_a_two_node_swarm_equals_local_through_a_node_killed_mid_generation(
    smollm2: Path, tmp_path: Path
):
    head = load_head(smollm2)
    ids = torch.tensor([chat_input_ids(head.tokenizer, chat_messages(QUESTION))])
    local = generate(head, LocalBackbone.load(smollm2, [(0, 30)]), ids, GREEDY)

    with LocalSwarm(tmp_path / "swarm", ready_timeout=300) as swarm:
        swarm.start(smollm2, blocks="0:15")
        second = swarm.start(smollm2, blocks="15:30")
        spare = swarm.start(smollm2, blocks="15:30")
        config = ClientConfig(
            initial_peers=tuple(swarm.initial_peers),
            identity=tmp_path / "client.key",
            prefer=frozenset({second.peer_id}),  # route through `second`, keep `spare` free
        )
        with DistributedModelForCausalLM.from_pretrained(smollm2, config=config) as model:
            plain = model.generate(ids, GREEDY)
            assert torch.equal(plain, local)

            produced: list[int] = []

            def kill_midway(tokens: torch.Tensor) -> None:
                produced.append(int(tokens[0]))
                if len(produced) == NEW_TOKENS // 2:
                    second.kill()

            survived = model.generate(ids, GREEDY, on_tokens=kill_midway)
            session = model.backbone.last_session
    assert torch.equal(survived, local)
    assert [f.peer_id for f in session.log.failovers] == [second.peer_id]
    assert spare.peer_id in {hop.peer_id for hop in session.route}
    assert "Paris" in head.tokenizer.decode(local[0])
