"""Generation through real `corolla node run` processes on 127.0.0.1 equals local generation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from swarm_fixtures import Swarm

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.client.model import DistributedModelForCausalLM
from corolla.client.swarm import ClientConfig
from corolla.verify.receipts import verify_request

PROMPT = "Corolla streams hidden states"


@pytest.fixture(scope="module", params=["bloom", "llama"])
def family_swarm(
    request: pytest.FixtureRequest, model_dirs: dict[str, Path], tmp_path_factory
) -> Iterator[tuple[Path, Swarm]]:
    """Nodes a[0:2] b[2:4] c[0:1] d[1:2]: a->b is a 2-node route, c->d->b a 3-node one."""
    model_dir = model_dirs[request.param]
    with Swarm(tmp_path_factory.mktemp(f"swarm-{request.param}")) as swarm:
        for blocks in ("0:2", "2:4", "0:1", "1:2"):
            swarm.start(model_dir, blocks=blocks)
        yield model_dir, swarm


def _client(swarm: Swarm, tmp_path: Path, allow: list[int] | None = None, **options):
    config = ClientConfig(
        initial_peers=tuple(swarm.initial_peers),
        identity=tmp_path / "client.key",
        allow=frozenset(swarm.nodes[i].peer_id for i in allow or []),
        **options,
    )
    return config


def _local(model_dir: Path, config: GenerationConfig) -> torch.Tensor:
    head = load_head(model_dir)
    input_ids = head.tokenizer(PROMPT, return_tensors="pt").input_ids
    return generate(head, LocalBackbone.load(model_dir, [(0, 4)]), input_ids, config)


@pytest.mark.parametrize(("allow", "hops"), [([0, 1], 2), ([2, 3, 1], 3)])
def test_greedy_generation_through_the_swarm_equals_local(family_swarm, tmp_path, allow, hops):
    model_dir, swarm = family_swarm
    config = GenerationConfig(max_new_tokens=24, stop_at_eos=False)
    client = _client(swarm, tmp_path, allow=allow, subspans=False)
    with DistributedModelForCausalLM.from_pretrained(model_dir, config=client) as model:
        input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
        tokens = model.generate(input_ids, config)
        route = model.backbone.last_session.route
        work = model.last_work
    assert torch.equal(tokens, _local(model_dir, config))
    assert len(route) == hops
    assert [hop.peer_id for hop in route] == [swarm.nodes[i].peer_id for i in allow]
    assert len(work) == 24 * hops  # one verified receipt per node per step
    for record in work:
        verify_request(record.request)


def test_seeded_sampling_through_the_swarm_equals_local_seeded_sampling(family_swarm, tmp_path):
    model_dir, swarm = family_swarm
    config = GenerationConfig(
        max_new_tokens=16, do_sample=True, temperature=0.8, top_k=40, seed=11, stop_at_eos=False
    )
    with DistributedModelForCausalLM.from_pretrained(
        model_dir, config=_client(swarm, tmp_path)
    ) as model:
        input_ids = model.tokenizer(PROMPT, return_tensors="pt").input_ids
        tokens = model.generate(input_ids, config)
    assert torch.equal(tokens, _local(model_dir, config))
