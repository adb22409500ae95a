"""Span loading reads only the span's tensors; sharded checkpoints; clear checkpoint errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import corolla.node.model.checkpoint as checkpoint_module
from corolla.cli import main
from corolla.client.head import load_head
from corolla.errors import CheckpointError, MissingTensor, SpanOutOfRange, UnsupportedModel
from corolla.node.model.checkpoint import Checkpoint, parse_span
from corolla.node.model.head import read_head
from corolla.node.model.manifest import MANIFEST_FILE, load_manifest
from corolla.node.model.span import load_span
from corolla.node.model.tiny import TinyModelConfig, create_tiny_model


class _RecordingSafeOpen:
    """The real safe_open, remembering which tensors were read."""

    def __init__(self) -> None:
        self.read: list[str] = []
        self._real = checkpoint_module.safe_open

    def __call__(self, *args, **kwargs):
        handle = self._real(*args, **kwargs)
        recorder = self

        class Handle:
            def __enter__(self):
                self._inner = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, name: str) -> torch.Tensor:
                recorder.read.append(name)
                return self._inner.get_tensor(name)

            def keys(self):
                return self._inner.keys()

            def get_slice(self, name: str):
                return self._inner.get_slice(name)

        return Handle()


def test_a_span_reads_only_its_own_blocks(
    family_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_manifest(Checkpoint(family_dir))  # the manifest is computed once, at creation
    recorder = _RecordingSafeOpen()
    monkeypatch.setattr(checkpoint_module, "safe_open", recorder)
    span = load_span(family_dir, 1, 3)
    prefixes = (span.family.block_prefix(1), span.family.block_prefix(2))
    assert recorder.read, "the span read nothing"
    assert all(name.startswith(prefixes) for name in recorder.read)
    expected = sum(p.numel() for p in span.blocks.parameters())
    assert expected == Checkpoint(family_dir).parameter_count(recorder.read)


def test_the_client_reads_only_the_head_tensors(
    family_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load_manifest(Checkpoint(family_dir))
    recorder = _RecordingSafeOpen()
    monkeypatch.setattr(checkpoint_module, "safe_open", recorder)
    head = load_head(family_dir)
    block_prefix = head.family.block_prefix(0).split("0.")[0]  # e.g. "transformer.h."
    assert recorder.read
    assert not any(name.startswith(block_prefix) for name in recorder.read)


def test_a_sharded_checkpoint_loads_the_same_span(family_dir: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(family_dir / name, sharded / name)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    single, split = load_span(family_dir, 1, 4), load_span(sharded, 1, 4)
    assert single.digest == split.digest
    hidden = torch.randn(1, 5, single.hidden_size)
    assert torch.equal(single.forward(hidden), split.forward(hidden))


def test_the_same_files_give_the_same_digests(family_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(family_dir, copy)
    (copy / MANIFEST_FILE).unlink(missing_ok=True)
    assert load_manifest(Checkpoint(copy)) == load_manifest(Checkpoint(family_dir))


def test_changing_one_weight_changes_the_block_and_model_digest(
    bloom_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "changed"
    shutil.copytree(bloom_dir, copy)
    (copy / MANIFEST_FILE).unlink(missing_ok=True)
    tensors = load_file(copy / "model.safetensors")
    tensors["transformer.h.2.mlp.dense_h_to_4h.bias"][0] += 1.0
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    original, changed = load_manifest(Checkpoint(bloom_dir)), load_manifest(Checkpoint(copy))
    assert original.block_digests[:2] == changed.block_digests[:2]
    assert original.block_digests[2] != changed.block_digests[2]
    assert original.model_digest != changed.model_digest
    assert original.span_digest(0, 2) == changed.span_digest(0, 2)


def test_a_stale_manifest_is_refused_when_the_weights_changed(
    bloom_dir: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "stale"
    shutil.copytree(bloom_dir, copy)
    load_manifest(Checkpoint(copy))
    tensors = load_file(copy / "model.safetensors")
    tensors["transformer.h.0.mlp.dense_h_to_4h.bias"][0] += 1.0
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="does not match its manifest"):
        load_span(copy, 0, 1)


def test_a_directory_without_a_checkpoint_is_a_checkpoint_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        Checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint(tmp_path / "missing")


def test_config_without_weights_is_a_checkpoint_error(bloom_dir: Path, tmp_path: Path) -> None:
    shutil.copy(bloom_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint(tmp_path)


def test_a_missing_tensor_is_named(bloom_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "missing"
    shutil.copytree(bloom_dir, copy)
    (copy / MANIFEST_FILE).unlink(missing_ok=True)
    tensors = load_file(copy / "model.safetensors")
    del tensors["transformer.h.1.self_attention.dense.weight"]
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingTensor, match=r"self_attention\.dense\.weight"):
        load_span(copy, 1, 2)


def test_an_unsupported_model_type_is_refused(bloom_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "gpt2"
    shutil.copytree(bloom_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "gpt2"
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match="gpt2"):
        Checkpoint(copy)


@pytest.mark.parametrize("span", [(0, 5), (3, 3), (4, 9)])
def test_a_span_outside_the_model_is_refused(bloom_dir: Path, span: tuple[int, int]) -> None:
    with pytest.raises(SpanOutOfRange, match="outside the model"):
        load_span(bloom_dir, *span)


@pytest.mark.parametrize("text", ["3", "a:b", "4:2", "-1:2", ""])
def test_malformed_span_text_is_refused(text: str) -> None:
    with pytest.raises(SpanOutOfRange):
        parse_span(text)


def _info(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`corolla model info ...` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(["model", "info", *args])
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_model_info_refuses_a_manifest_that_no_longer_matches_the_weights(
    bloom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "stale"
    shutil.copytree(bloom_dir, copy)
    stored = load_manifest(Checkpoint(copy))
    tensors = load_file(copy / "model.safetensors")
    tensors["transformer.h.2.mlp.dense_h_to_4h.bias"][0] += 1.0
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    code, out, err = _info(capsys, str(copy), "--json")
    assert code != 0 and out == ""
    assert "does not match the tensors" in err and "block 2 differ" in err
    # Asked not to verify, it prints the stored digests and says they were not checked.
    code, out, _ = _info(capsys, str(copy), "--json", "--no-verify")
    summary = json.loads(out)
    assert code == 0 and summary["verified"] is False and "NOT checked" in summary["digests"]
    assert summary["model_digest"] == stored.model_digest.hex()


def test_model_info_refuses_a_manifest_copied_from_another_model(
    model_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The test BLOOM's config (so the same config digest) with other weights.
    tiny = TinyModelConfig(
        family="bloom", num_layers=4, hidden_size=64, num_heads=4, seed=11, initializer_range=0.3
    )
    target = create_tiny_model(tmp_path / "target", tiny)
    assert (target / "config.json").read_text() == (model_dirs["bloom"] / "config.json").read_text()
    load_manifest(Checkpoint(model_dirs["bloom"]))
    shutil.copy(model_dirs["bloom"] / MANIFEST_FILE, target / MANIFEST_FILE)
    code, _, err = _info(capsys, str(target))
    assert code != 0 and "does not match the tensors" in err
    other = tmp_path / "llama-manifest"
    shutil.copytree(model_dirs["bloom"], other)
    load_manifest(Checkpoint(model_dirs["llama"]))
    shutil.copy(model_dirs["llama"] / MANIFEST_FILE, other / MANIFEST_FILE)
    code, _, err = _info(capsys, str(other))
    assert code != 0 and "describes a llama model" in err


def test_model_info_verifies_and_reports_matching_weights(
    family_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _info(capsys, str(family_dir), "--json")
    summary = json.loads(out)
    assert code == 0 and summary["verified"] is True
    assert summary["model_digest"] == load_manifest(Checkpoint(family_dir)).model_digest.hex()
    assert all(count > 0 for count in summary["block_parameters"])


def test_the_head_is_checked_against_the_manifest(bloom_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "head-changed"
    shutil.copytree(bloom_dir, copy)
    load_manifest(Checkpoint(copy))
    tensors = load_file(copy / "model.safetensors")
    tensors["transformer.ln_f.bias"][0] += 1.0
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    checkpoint = Checkpoint(copy)
    with pytest.raises(CheckpointError, match=r"head tensors .* do not match"):
        read_head(checkpoint, load_manifest(checkpoint))
    fresh = Checkpoint(bloom_dir)
    head = read_head(fresh, load_manifest(fresh))
    reference = load_head(bloom_dir).head
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(
        head.logits(head.embed_tokens(ids)), reference.logits(reference.embed_tokens(ids))
    )
