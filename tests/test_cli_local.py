"""The command line for models and local generation: real subprocesses, real exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM


def corolla(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corolla", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        check=False,
    )


def test_create_tiny_twice_gives_the_same_model_digest(tmp_path: Path):
    digests = []
    for name in ("a", "b"):
        created = corolla(
            "model",
            "create-tiny",
            str(tmp_path / name),
            "--family",
            "llama",
            "--layers",
            "2",
            "--hidden-size",
            "32",
            "--heads",
            "4",
            "--kv-heads",
            "2",
        )
        assert created.returncode == 0, created.stderr
        info = corolla("model", "info", str(tmp_path / name), "--json")
        assert info.returncode == 0, info.stderr
        digests.append(json.loads(info.stdout))
    assert digests[0]["model_digest"] == digests[1]["model_digest"]
    assert digests[0]["family"] == "llama" and digests[0]["blocks"] == 2
    assert len(digests[0]["block_digests"]) == 2


def test_generate_local_json_equals_transformers_greedy(bloom_dir: Path):
    result = corolla(
        "generate",
        "--local",
        "--model",
        str(bloom_dir),
        "--splits",
        "0:1,1:4",
        "--max-new-tokens",
        "32",
        "--no-eos",
        "--json",
        "Corolla says",
    )
    assert result.returncode == 0, result.stderr
    output = json.loads(result.stdout)
    model = AutoModelForCausalLM.from_pretrained(bloom_dir, dtype=torch.float32)
    prompt = torch.tensor([output["prompt_token_ids"]])
    reference = model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert output["token_ids"] == reference[0, prompt.shape[1] :].tolist()
    assert output["timings"]["tokens_per_s"] > 0


def test_generate_local_streams_text_after_the_prompt(llama_dir: Path):
    result = corolla(
        "generate", "--local", "--model", str(llama_dir), "--max-new-tokens", "8", "hello"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("hello")


def _one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_a_directory_without_a_checkpoint_is_a_one_line_error(tmp_path: Path):
    _one_line_error(corolla("model", "info", str(tmp_path)), "error:", "config.json")
    _one_line_error(
        corolla("generate", "--local", "--model", str(tmp_path), "hi"), "error:", "config.json"
    )


def test_chat_without_a_template_or_a_system_message_without_chat_is_a_one_line_error(
    bloom_dir: Path,
):
    no_template = corolla("generate", "--local", "--model", str(bloom_dir), "--chat", "hi")
    _one_line_error(no_template, "error:", "no chat template")
    alone = corolla("generate", "--local", "--model", str(bloom_dir), "--system", "be terse", "hi")
    _one_line_error(alone, "error:", "--system goes with --chat")


def test_an_unsupported_model_type_is_a_one_line_error(bloom_dir: Path, tmp_path: Path):
    copy = tmp_path / "other"
    shutil.copytree(bloom_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(config))
    _one_line_error(corolla("model", "info", str(copy)), "unsupported model type")


def test_a_missing_tensor_is_a_one_line_error(bloom_dir: Path, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "holes"
    shutil.copytree(bloom_dir, copy)
    (copy / "corolla-manifest.json").unlink(missing_ok=True)
    tensors = load_file(copy / "model.safetensors")
    del tensors["transformer.ln_f.weight"]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    _one_line_error(
        corolla("generate", "--local", "--model", str(copy), "hi"), "transformer.ln_f.weight"
    )


@pytest.mark.parametrize("splits", ["0:2,2:9", "0:2,3:4", "x"])
def test_a_span_outside_the_model_is_a_one_line_error(bloom_dir: Path, splits: str):
    _one_line_error(
        corolla("generate", "--local", "--model", str(bloom_dir), "--splits", splits, "hi"),
        "error:",
    )


def test_an_empty_prompt_is_a_one_line_error(bloom_dir: Path):
    _one_line_error(
        corolla("generate", "--local", "--model", str(bloom_dir), ""), "prompt is empty"
    )


def test_a_prompt_longer_than_the_context_is_a_one_line_error(bloom_dir: Path):
    _one_line_error(corolla("generate", "--local", "--model", str(bloom_dir), "x" * 600), "context")


def test_bad_sampling_options_are_a_one_line_error(bloom_dir: Path):
    _one_line_error(
        corolla("generate", "--local", "--model", str(bloom_dir), "--top-p", "1.5", "hi"),
        "top-p",
    )
