"""`corolla model import-gguf`: a GGUF file written here with the `gguf` package (as llama.cpp's
converter lays it out) becomes a checkpoint with the same tensors, logits and tokenizer; bad or
unsupported files get a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from corolla.errors import CheckpointError, UnsupportedModel
from corolla.node.model.chat import chat_input_ids, chat_messages, load_tokenizer
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.gguf_import import import_gguf
from corolla.node.model.manifest import load_manifest
from corolla.node.model.span import load_span

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def _permute_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows for its rotary kernel (transformers undoes it)."""
    shape = weights.shape
    return (
        weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def _split_bloom_qkv(weights: np.ndarray, heads: int, hidden: int) -> np.ndarray:
    """llama.cpp stores BLOOM's fused per-head [q k v] rows as all q, then all k, then all v."""
    if weights.ndim == 2:
        fused = weights.reshape(heads, 3, hidden // heads, hidden)
        return np.concatenate([fused[:, i].reshape(-1, hidden) for i in range(3)], axis=0)
    fused = weights.reshape(heads, 3, hidden // heads)
    return np.concatenate([fused[:, i].reshape(hidden) for i in range(3)])


def write_gguf(checkpoint: Path, out: Path, architecture: str | None = None) -> Path:
    """An fp32 GGUF of a tiny checkpoint, with its byte-level tokenizer and a chat template."""
    config = json.loads((checkpoint / "config.json").read_text())
    tensors = load_file(checkpoint / "model.safetensors")
    family = config["model_type"]
    layers = config.get("num_hidden_layers") or config["n_layer"]
    writer = gguf.GGUFWriter(out, architecture or family)
    writer.add_name("corolla test model")
    writer.add_block_count(layers)
    writer.add_embedding_length(config["hidden_size"])
    if family == "llama":
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        writer.add_context_length(config["max_position_embeddings"])
        writer.add_feed_forward_length(config["intermediate_size"])
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
        writer.add_rope_dimension_count(config["hidden_size"] // heads)
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    else:
        heads, hidden = config["n_head"], config["hidden_size"]
        writer.add_context_length(config["seq_length"])
        writer.add_feed_forward_length(4 * hidden)
        writer.add_head_count(heads)
        writer.add_head_count_kv(heads)
        writer.add_layer_norm_eps(config["layer_norm_epsilon"])
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BLOOM, layers)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    special = {added["id"] for added in tokenizer["added_tokens"]}
    vocab.update({added["content"]: added["id"] for added in tokenizer["added_tokens"]})
    by_id = {index: token for token, index in vocab.items()}
    tokens, types = [], []
    for index in range(config["vocab_size"]):
        tokens.append(by_id.get(index, f"[PAD{index}]"))
        kind = gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
        types.append(kind if index in by_id else gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores([0.0] * len(tokens))  # no merges: every byte is its own token
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_chat_template(CHAT_TEMPLATE)

    for name, tensor in tensors.items():
        data = tensor.numpy()
        base, _, suffix = name.rpartition(".")
        mapped = names.get_name(base) or names.get_name(base.removeprefix("transformer."))
        if family == "llama" and name.endswith("q_proj.weight"):
            data = _permute_rotary(data, heads)
        elif family == "llama" and name.endswith("k_proj.weight"):
            data = _permute_rotary(data, kv_heads)
        elif family == "bloom" and "query_key_value" in name:
            data = _split_bloom_qkv(data, heads, hidden)
        writer.add_tensor(f"{mapped}.{suffix}", np.ascontiguousarray(data, dtype=np.float32))
    if family == "bloom":  # llama.cpp writes BLOOM's tied output matrix out
        writer.add_tensor("output.weight", tensors["transformer.word_embeddings.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def imported(model_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """{family: (original checkpoint, its GGUF, the checkpoint imported from the GGUF)}"""
    root = tmp_path_factory.mktemp("gguf")
    result = {}
    for family, original in model_dirs.items():
        gguf_file = write_gguf(original, root / f"{family}.gguf")
        result[family] = (original, gguf_file, import_gguf(gguf_file, root / f"{family}-imported"))
    return result


@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_an_imported_gguf_has_the_same_tensors_and_logits(imported, family: str):
    original, _, converted = imported[family]
    before, after = load_manifest(Checkpoint(original)), load_manifest(Checkpoint(converted))
    assert after.block_digests == before.block_digests
    assert after.head_digest == before.head_digest
    input_ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = AutoModelForCausalLM.from_pretrained(original).eval()(input_ids).logits
        got = AutoModelForCausalLM.from_pretrained(converted).eval()(input_ids).logits
    assert torch.equal(got, expected)
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    assert torch.equal(
        load_span(converted, 0, 4).forward(hidden), load_span(original, 0, 4).forward(hidden)
    )


@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_an_imported_gguf_keeps_its_tokenizer_and_chat_template(imported, family: str):
    original, _, converted = imported[family]
    text = "Héllo, wörld </s> 42"
    before, after = AutoTokenizer.from_pretrained(original), load_tokenizer(converted)
    assert after(text).input_ids == before(text).input_ids
    ids = chat_input_ids(after, chat_messages("hi", system="be brief"))
    assert after.decode(ids) == "<s>system: be brief</s><s>user: hi</s><s>assistant: "
    assert json.loads((converted / "corolla-source.json").read_text())["architecture"] == family


def test_importing_into_a_directory_that_holds_files_is_refused(imported, tmp_path: Path):
    _, gguf_file, _ = imported["llama"]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        import_gguf(gguf_file, tmp_path / "busy")
    assert [p.name for p in tmp_path.iterdir()] == ["busy"]


def _bad_files(imported, root: Path) -> dict[str, Path]:
    _, gguf_file, _ = imported["llama"]
    data = gguf_file.read_bytes()
    truncated = root / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    not_gguf = root / "model.safetensors.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF")
    other = root / "gpt2.gguf"
    writer = gguf.GGUFWriter(other, "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"truncated": truncated, "not GGUF": not_gguf, "unsupported": other}


def test_bad_gguf_files_are_refused_with_a_typed_error(imported, tmp_path: Path):
    bad = _bad_files(imported, tmp_path)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        import_gguf(bad["truncated"], tmp_path / "a")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        import_gguf(bad["not GGUF"], tmp_path / "b")
    with pytest.raises(UnsupportedModel, match="'gpt2'"):
        import_gguf(bad["unsupported"], tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_the_command_imports_and_gives_one_line_errors(imported, tmp_path: Path):
    def corolla(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corolla", "model", "import-gguf", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
            check=False,
        )

    _, gguf_file, _ = imported["bloom"]
    good = corolla(str(gguf_file), str(tmp_path / "imported"))
    assert good.returncode == 0, good.stderr
    assert "imported" in good.stdout and Checkpoint(tmp_path / "imported").num_blocks == 4
    # Every refusal is a CorollaError (previous test); one real process shows how it ends.
    bad = corolla(str(_bad_files(imported, tmp_path)["truncated"]), str(tmp_path / "never"))
    assert bad.returncode != 0
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), bad.stderr
    assert "truncated or corrupt" in lines[0] and not (tmp_path / "never").exists()
