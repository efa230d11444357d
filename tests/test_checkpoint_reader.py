"""Reader: lazy metadata, sharded layouts, index validation, pickle refusal, fp8."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from weightsmith.checkpoint.reader import Checkpoint
from weightsmith.checkpoint.resolve import open_checkpoint
from weightsmith.errors import CheckpointError


def _write_sharded(tmp_path, tensors_per_file: list[dict[str, torch.Tensor]], index: dict | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    wm = {}
    n = len(tensors_per_file)
    for k, tensors in enumerate(tensors_per_file, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(tensors, tmp_path / fname, metadata={"format": "pt"})
        wm.update({name: fname for name in tensors})
    idx = index if index is not None else {"metadata": {"total_size": 0}, "weight_map": wm}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    return tmp_path


def test_lazy_metadata_and_data(tmp_path):
    a, b = torch.randn(4, 3), torch.arange(6, dtype=torch.int32)
    _write_sharded(tmp_path, [{"a": a}, {"b": b.to(torch.int32)}])
    ck = Checkpoint(tmp_path)
    assert ck.names == ["a", "b"]
    assert ck.info("a").shape == (4, 3) and ck.info("a").dtype == torch.float32
    assert ck.info("b").dtype == torch.int32 and ck.info("b").file.startswith("model-00002")
    assert torch.equal(ck.get("a"), a) and torch.equal(ck.get("b"), b)
    assert ck.get("a", dtype=torch.bfloat16).dtype == torch.bfloat16
    assert bytes(ck.read_raw("a")) == a.numpy().tobytes()


@pytest.mark.parametrize("bad", ["../x.safetensors", "/etc/passwd", "sub/x.safetensors", ".."])
def test_index_must_name_plain_files_inside(tmp_path, bad):
    _write_sharded(tmp_path, [{"a": torch.zeros(2)}], index={"weight_map": {"a": bad}})
    with pytest.raises(CheckpointError, match="plain file name|outside"):
        Checkpoint(tmp_path)


def test_symlink_escaping_directory_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    save_file({"a": torch.zeros(2)}, outside / "real.safetensors")
    ck_dir = tmp_path / "ck"
    ck_dir.mkdir()
    os.symlink(outside / "real.safetensors", ck_dir / "model-00001-of-00001.safetensors")
    (ck_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00001.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside"):
        Checkpoint(ck_dir)


def test_missing_listed_tensor(tmp_path):
    _write_sharded(
        tmp_path,
        [{"a": torch.zeros(2)}],
        index={"weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}},
    )
    with pytest.raises(CheckpointError, match="'b' is listed .* but missing"):
        Checkpoint(tmp_path)


def test_missing_shard_file(tmp_path):
    _write_sharded(
        tmp_path,
        [{"a": torch.zeros(2)}],
        index={"weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00002-of-00002.safetensors"}},
    )
    with pytest.raises(CheckpointError, match="missing from"):
        Checkpoint(tmp_path)


def test_tensor_in_two_shards(tmp_path):
    _write_sharded(
        tmp_path,
        [{"a": torch.zeros(2)}, {"a": torch.ones(2), "b": torch.ones(1)}],
        index={"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}},
    )
    with pytest.raises(CheckpointError, match="'a'"):
        Checkpoint(tmp_path)


def test_truncated_and_corrupt_files(tmp_path):
    save_file({"a": torch.randn(64, 64)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(CheckpointError, match="corrupt"):
        Checkpoint(tmp_path)


def test_pickle_refused_unless_allowed(tmp_path):
    torch.save({"a": torch.arange(3.0)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        Checkpoint(tmp_path)
    ck = Checkpoint(tmp_path, allow_pickle=True)
    assert torch.equal(ck.get("a"), torch.arange(3.0))


def test_pickle_with_code_is_rejected_even_when_allowed(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"a": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        Checkpoint(tmp_path, allow_pickle=True)


def test_fp8_block_scales(tmp_path):
    from weightsmith.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise

    w = torch.randn(300, 200)
    q, s = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (3, 2)
    save_file({"l.weight": q, "l.weight_scale_inv": s}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    )
    ck = Checkpoint(tmp_path)
    assert ck.is_fp8("l.weight") and ck.scale_of("l.weight") == "l.weight_scale_inv"
    deq = ck.get("l.weight", dequantize=True)
    assert torch.equal(deq, dequantize_blockwise(q, s))
    # e4m3 has a 3-bit mantissa: relative error per element below 2^-4 of the block max
    err = (deq - w).abs().max() / w.abs().max()
    assert err < 0.07
    # raw fp8 bytes survive untouched
    assert ck.get("l.weight").view(torch.uint8).equal(q.view(torch.uint8))


def test_open_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        open_checkpoint(str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        open_checkpoint(str(tmp_path / "f.txt"))
    with pytest.raises(CheckpointError, match="Hugging Face cache"):
        open_checkpoint("some-org/surely-not-cached-model")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no weights"):
        open_checkpoint(str(empty))


def test_hub_cache_resolution(tmp_path, monkeypatch):
    """A repo in the local HF cache opens offline; its snapshot symlinks into blobs/ are allowed."""
    hub = tmp_path / "hub"
    repo = hub / "models--org--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, blobs / "blob1")
    os.symlink("../../blobs/blob1", snap / "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    ck = open_checkpoint("org/tiny")
    assert ck.origin.kind == "hub" and ck.origin.repo_id == "org/tiny" and ck.origin.revision == "abc123"
    assert torch.equal(ck.get("a"), torch.ones(2))
