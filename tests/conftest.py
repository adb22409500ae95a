"""Shared fixtures: tiny deterministic checkpoints (made once per test session) and a pair of
hivemind daemons on 127.0.0.1 (once per test module)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from hivemind.p2p import P2P
from transformers.utils import logging as hf_logging

from corolla.node.model.tiny import TinyModelConfig, create_tiny_model
from corolla.node.protocol.p2p_options import p2p_options

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

# Small enough for CI's two cores, large enough for varied greedy tokens (wide init).
TEST_MODELS = {
    "bloom": TinyModelConfig(
        family="bloom", num_layers=4, hidden_size=64, num_heads=4, seed=2, initializer_range=0.3
    ),
    "llama": TinyModelConfig(
        family="llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, seed=2
    ),
}


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: create_tiny_model(root / name, tiny) for name, tiny in TEST_MODELS.items()}


@pytest.fixture(scope="session")
def bloom_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["bloom"]


@pytest.fixture(scope="session")
def llama_dir(model_dirs: dict[str, Path]) -> Path:
    return model_dirs["llama"]


@pytest.fixture(params=["bloom", "llama"])
def family_dir(request: pytest.FixtureRequest, model_dirs: dict[str, Path]) -> Path:
    return model_dirs[request.param]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemons() -> AsyncIterator[tuple[P2P, P2P]]:
    """(server, client): the client's daemon knows the server's; both shut down at the end."""
    server = await P2P.create(**p2p_options())
    try:
        client = await P2P.create(**p2p_options(), initial_peers=await server.get_visible_maddrs())
        try:
            yield server, client
        finally:
            await client.shutdown()
    finally:
        await server.shutdown()
