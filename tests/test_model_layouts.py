"""Checkpoints load as they are published: BLOOM with and without the `transformer.` prefix,
Llama with tied and untied embeddings and legacy rope settings, hub ids from a hub cache
(offline); each span keeps its own rotary table."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from corolla.client.generation import GenerationConfig, generate
from corolla.client.head import load_head
from corolla.client.local import LocalBackbone
from corolla.errors import CheckpointError, MissingTensor
from corolla.node.model.checkpoint import Checkpoint
from corolla.node.model.manifest import MANIFEST_FILE, load_manifest
from corolla.node.model.span import load_span
from corolla.node.model.tiny import save_byte_tokenizer


def _copy_with_keys(source: Path, target: Path, rename, drop: tuple[str, ...] = ()) -> Path:
    """A copy of `source` whose tensors are stored under rename(key), without `drop`."""
    shutil.copytree(source, target)
    (target / MANIFEST_FILE).unlink(missing_ok=True)
    tensors = load_file(target / "model.safetensors")
    renamed = {rename(name): t for name, t in tensors.items() if name not in drop}
    save_file(renamed, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _tied_llama(directory: Path) -> Path:
    """A Llama that ties its LM head to the embeddings (SmolLM2's shape), as transformers saves
    it: no lm_head.weight in the file."""
    config = LlamaConfig(
        vocab_size=264,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=258,
        tie_word_embeddings=True,
    )
    torch.manual_seed(5)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(directory)
    save_byte_tokenizer(directory)
    return directory


def _assert_generates_like_transformers(model_dir: Path) -> None:
    head = load_head(model_dir)
    input_ids = torch.tensor([head.tokenizer("Published checkpoints load").input_ids])
    config = GenerationConfig(max_new_tokens=16)  # both stop at the end-of-text token
    ours = generate(head, LocalBackbone.load(model_dir, [(0, 1), (1, 4)]), input_ids, config)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = reference.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=16,
            do_sample=False,
        )[:, input_ids.shape[1] :]
    assert torch.equal(ours, theirs)
    assert len(set(ours[0].tolist())) > 3, "the test model should not repeat one token"


def test_a_bloom_checkpoint_in_bigscience_layout_loads_and_generates(
    bloom_dir: Path, tmp_path: Path
):
    # bigscience/bloom-* store BloomModel's keys (h.0..., word_embeddings...) and no lm_head.
    published = _copy_with_keys(
        bloom_dir,
        tmp_path / "bloom-published",
        lambda name: name.removeprefix("transformer."),
        drop=("lm_head.weight",),
    )
    assert "h.0.self_attention.query_key_value.weight" in load_file(published / "model.safetensors")
    checkpoint = Checkpoint(published)
    assert checkpoint.layout.name.startswith("BloomModel")
    _assert_generates_like_transformers(published)
    # The same tensors under other names are the same model.
    assert load_manifest(checkpoint) == load_manifest(Checkpoint(bloom_dir))


def test_a_tied_llama_without_an_lm_head_tensor_loads_and_generates(tmp_path: Path):
    tied = _tied_llama(tmp_path / "tied")
    checkpoint = Checkpoint(tied)
    assert checkpoint.config.tie_word_embeddings and not checkpoint.has("lm_head.weight")
    assert checkpoint.head_tensor_map()["lm_head.weight"] == "model.embed_tokens.weight"
    _assert_generates_like_transformers(tied)


def test_an_untied_llama_and_a_llama_saved_without_the_model_prefix_load(
    llama_dir: Path, tmp_path: Path
):
    _assert_generates_like_transformers(llama_dir)
    bare = _copy_with_keys(llama_dir, tmp_path / "bare", lambda name: name.removeprefix("model."))
    assert Checkpoint(bare).layout.name.startswith("LlamaModel")
    assert load_manifest(Checkpoint(bare)) == load_manifest(Checkpoint(llama_dir))


def test_an_untied_llama_missing_its_lm_head_names_the_tensor(llama_dir: Path, tmp_path: Path):
    broken = _copy_with_keys(llama_dir, tmp_path / "no-head", str, drop=("lm_head.weight",))
    with pytest.raises(MissingTensor, match=r"lm_head\.weight"):
        load_head(broken)


def test_a_legacy_rope_scaling_config_is_honoured(llama_dir: Path, tmp_path: Path):
    scaled = tmp_path / "rope-scaling"
    shutil.copytree(llama_dir, scaled)
    (scaled / MANIFEST_FILE).unlink(missing_ok=True)
    config = json.loads((scaled / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = 500000.0
    config["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    (scaled / "config.json").write_text(json.dumps(config))
    _assert_generates_like_transformers(scaled)
    hidden = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(1))
    plain = load_span(llama_dir, 0, 2).forward(hidden)
    assert not torch.allclose(load_span(scaled, 0, 2).forward(hidden), plain)


def test_unknown_tensor_names_get_an_error_naming_the_known_layouts(
    bloom_dir: Path, tmp_path: Path
):
    odd = _copy_with_keys(bloom_dir, tmp_path / "odd", lambda name: "backbone." + name)
    with pytest.raises(CheckpointError) as caught:
        Checkpoint(odd)
    message = str(caught.value)
    assert "BloomForCausalLM" in message and "BloomModel" in message
    assert "backbone." in message


def test_each_span_keeps_its_own_rotary_table_after_another_config_is_collected(
    llama_dir: Path, tmp_path: Path
):
    other = tmp_path / "other-rope"
    shutil.copytree(llama_dir, other)
    (other / MANIFEST_FILE).unlink(missing_ok=True)
    config = json.loads((other / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 30.0}
    (other / "config.json").write_text(json.dumps(config))
    hidden = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(2))

    first = load_span(llama_dir, 0, 4)
    first.forward(hidden)
    first_config = weakref.ref(first.config)
    del first
    gc.collect()
    # Nothing outlives a span's config: a table cache keyed by id(config) would keep it (or,
    # once it was collected and its id reused, hand its table to another config).
    assert first_config() is None, "something still holds the collected span's config"
    second = load_span(other, 0, 4)
    reference = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()
    outputs: list[torch.Tensor] = []
    reference.model.layers[-1].register_forward_hook(lambda _m, _i, out: outputs.append(out))
    with torch.inference_mode():
        reference.model(inputs_embeds=hidden, use_cache=False)
    expected = outputs[0]  # what the last block returned, before the final norm
    torch.testing.assert_close(second.forward(hidden), expected, atol=1e-5, rtol=0)
    assert second.position_encoder is not None
    assert second.position_encoder.inv_freq[1] == pytest.approx(30.0 ** (-2 / 16))


def _hub_cache(root: Path, repo: str, snapshot_from: Path, files: list[str]) -> Path:
    """A huggingface_hub cache holding only `files` of a repo: blobs, a snapshot of symlinks
    and refs/main, as the hub client lays it out."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for index, name in enumerate(files):
        blob = repo_dir / "blobs" / f"{index:040x}"
        shutil.copy(snapshot_from / name, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_a_hub_id_loads_a_span_from_a_hub_cache_offline_with_only_its_shards(
    bloom_dir: Path, tmp_path: Path
):
    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(bloom_dir, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bloom_dir / name, sharded / name)
    local = Checkpoint(sharded)
    manifest = load_manifest(local)  # a published manifest, as a Corolla model repo ships one
    needed = {path.name for path in local.files_of(local.block_tensor_names(2))}
    needed |= {path.name for path in local.files_of(set(local.head_tensor_map().values()))}
    shards = {path.name for path in local.files_of(local.tensor_names)}
    assert needed < shards, "the test needs shards the span does not use"
    metadata = ["config.json", "model.safetensors.index.json", MANIFEST_FILE]
    metadata += ["tokenizer.json", "tokenizer_config.json"]
    _hub_cache(tmp_path / "hub", "corolla/tiny-bloom", sharded, metadata + sorted(needed))

    script = textwrap.dedent(
        """
        import json, sys, torch
        from corolla.client.head import load_head
        from corolla.errors import CheckpointError
        from corolla.node.model.span import load_span
        span = load_span("corolla/tiny-bloom", 2, 3)
        head = load_head("corolla/tiny-bloom")
        hidden = torch.randn(1, 5, span.hidden_size, generator=torch.Generator().manual_seed(3))
        try:
            load_span("corolla/tiny-bloom", 0, 1)
            missing = ""
        except CheckpointError as error:
            missing = str(error)
        print(json.dumps({
            "digest": span.digest.hex(),
            "output": span.forward(hidden).flatten().tolist(),
            "model_digest": head.model_digest.hex(),
            "missing": missing,
        }))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    span = load_span(sharded, 2, 3)
    hidden = torch.randn(1, 5, span.hidden_size, generator=torch.Generator().manual_seed(3))
    assert answer["digest"] == span.digest.hex()
    assert answer["model_digest"] == manifest.model_digest.hex()
    assert torch.equal(torch.tensor(answer["output"]), span.forward(hidden).flatten())
    assert "not in the hub cache" in answer["missing"]
