"""Writer: sharding, HF layout, determinism, atomicity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from conftest import leftovers
from weightsmith.checkpoint.reader import Checkpoint
from weightsmith.checkpoint.writer import CheckpointWriter, TensorSpec, assign_shards
from weightsmith.errors import WeightsmithError


class _Cfg:
    def save_pretrained(self, d):
        (d / "config.json").write_text("{}")


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.10.w": torch.randn(8, 8, generator=g),
        "model.layers.2.w": torch.randn(16, 4, generator=g).to(torch.bfloat16),
        "model.embed": torch.randn(32, 8, generator=g).half(),
        "ids": torch.arange(5, dtype=torch.int64),
        "f8": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn),
    }


def _write(dst, tensors, max_shard=10**9, order=None, **kw):
    with CheckpointWriter(dst, max_shard_size=max_shard, **kw) as w:
        w.plan([TensorSpec.of(n, t) for n, t in tensors.items()])
        for n in order or list(tensors)[::-1]:
            w.write(n, tensors[n])
        w.set_config(_Cfg())
        w.finalize()
    return dst


def test_single_file_roundtrip(tmp_path):
    t = _tensors()
    out = _write(tmp_path / "o", t)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    ck = Checkpoint(out)
    for n, v in t.items():
        assert ck.get(n).dtype == v.dtype and torch.equal(ck.get(n).view(torch.uint8), v.view(torch.uint8))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == sorted(f.keys())


def test_sharded_layout_and_index(tmp_path):
    t = _tensors()
    out = _write(tmp_path / "o", t, max_shard=300)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert list(idx["weight_map"]) == sorted(idx["weight_map"])
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    ck = Checkpoint(out)
    assert set(ck.names) == set(t)
    # natural order keeps layer 2 before layer 10
    order = [n for n in ck.file_order() if n.startswith("model.layers")]
    assert order == ["model.layers.2.w", "model.layers.10.w"]


def test_deterministic_regardless_of_write_order(tmp_path):
    t = _tensors()
    a = _write(tmp_path / "a", t, max_shard=300)
    b = _write(tmp_path / "b", t, max_shard=300, order=list(t))
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def test_assign_shards_big_tensor_alone():
    specs = [
        TensorSpec("a", (10,), torch.float32),
        TensorSpec("b", (1000,), torch.float32),
        TensorSpec("c", (10,), torch.float32),
    ]
    groups = assign_shards(specs, 100)
    assert [[s.name for s in g] for g in groups] == [["a"], ["b"], ["c"]]


def test_failure_midway_leaves_nothing(tmp_path):
    t = _tensors()
    dst = tmp_path / "o"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(dst) as w:
            w.plan([TensorSpec.of(n, v) for n, v in t.items()])
            w.write("ids", t["ids"])
            raise RuntimeError("boom")
    assert not dst.exists() and leftovers(tmp_path, "o") == []


def test_refuses_existing_output_and_replaces_with_force(tmp_path):
    t = _tensors()
    dst = _write(tmp_path / "o", t)
    with pytest.raises(WeightsmithError, match="already exists.*--force"):
        CheckpointWriter(dst)
    t2 = {"x": torch.ones(3)}
    with pytest.raises(WeightsmithError, match="not a weightsmith output"):
        _write(dst, t2, force=True)  # no manifest.json: not ours to replace
    (dst / "manifest.json").write_text('{"tool": {"name": "weightsmith"}}')
    _write(dst, t2, force=True)
    assert Checkpoint(dst).names == ["x"] and leftovers(tmp_path, "o") == []


def test_incomplete_or_wrong_writes_refused(tmp_path):
    with CheckpointWriter(tmp_path / "o") as w:
        w.plan([TensorSpec("a", (2,), torch.float32), TensorSpec("b", (2,), torch.float32)])
        with pytest.raises(WeightsmithError, match="planned"):
            w.write("a", torch.ones(3))
        with pytest.raises(WeightsmithError, match="not in the output plan"):
            w.write("zzz", torch.ones(2))
        with pytest.raises(WeightsmithError, match="NaN"):
            w.write("a", torch.tensor([1.0, float("nan")]))
        w.write("a", torch.ones(2))
        w.set_config(_Cfg())
        with pytest.raises(WeightsmithError, match="never written"):
            w.finalize()
    assert not (tmp_path / "o").exists() and leftovers(tmp_path, "o") == []


def test_plan_layout_keeps_given_shards(tmp_path):
    import torch

    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.checkpoint.writer import CheckpointWriter, TensorSpec

    names = [f"t{i}" for i in range(6)]
    layout = {
        "t0": "b.safetensors",
        "t1": "a.safetensors",
        "t2": "b.safetensors",
        "t3": "a.safetensors",
        "t4": "a.safetensors",
    }
    with CheckpointWriter(tmp_path / "o", max_shard_size=10**9) as w:
        w.plan([TensorSpec(n, (4,), torch.float32) for n in names], layout=layout)
        for i, n in enumerate(names):
            w.write(n, torch.full((4,), float(i)))
        w.set_config(_Cfg())
        w.finalize()
    ck = Checkpoint(tmp_path / "o")
    by_file = {}
    for n in names:
        by_file.setdefault(ck.info(n).file, []).append(n)
    assert sorted(map(sorted, by_file.values())) == [["t0", "t2"], ["t1", "t3", "t4"], ["t5"]]
    assert torch.equal(ck.get("t3"), torch.full((4,), 3.0))


def test_write_range_fills_a_tensor_in_parts(tmp_path):
    """Parts from any order/thread assemble the tensor; overlaps and out-of-range parts are refused."""
    import torch

    from weightsmith.checkpoint.reader import Checkpoint

    full = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    raw = memoryview(full.reshape(-1).view(torch.uint8).numpy())
    with CheckpointWriter(tmp_path / "o") as w:
        w.plan([TensorSpec("t", (3, 4), torch.float32), TensorSpec("u", (2,), torch.float32)])
        w.write_range("t", 32, full[2])  # last row first, as a tensor
        with pytest.raises(WeightsmithError, match="written twice"):
            w.write_range("t", 40, full[2, 2:])
        with pytest.raises(WeightsmithError, match="outside"):
            w.write_range("t", 40, bytes(16))
        with pytest.raises(WeightsmithError, match="planned"):
            w.write_range("t", 0, torch.zeros(2, dtype=torch.float16))
        with pytest.raises(WeightsmithError, match="NaN"):
            w.write_range("t", 0, torch.tensor([float("nan")]))
        w.write_range("t", 0, raw[:16])
        assert w.missing() == ["t", "u"]
        with pytest.raises(WeightsmithError, match="written twice"):
            w.write("t", full)  # partially written: a whole write would overlap
        w.write_range("t", 16, raw[16:32])
        assert w.missing() == ["u"]
        with pytest.raises(WeightsmithError, match="written twice"):
            w.write_range("t", 0, raw[:4])
        w.write("u", torch.ones(2))
        w.set_config(_Cfg())
        w.finalize()
    assert torch.equal(Checkpoint(tmp_path / "o").get("t"), full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_catches_nan_and_inf(dtype):
    from weightsmith.checkpoint.writer import all_finite

    t = torch.randn(1000).to(dtype)
    assert all_finite(t) and all_finite(t[:0])
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[517] = bad
        assert not all_finite(u), (dtype, bad)


def test_a_joined_writer_fills_rank_0s_files_and_rank_0_counts_its_ranges(tmp_path):
    """What ranks > 0 do under a launcher (tests/test_distributed.py runs it for real): write into
    rank 0's staging files at the planned offsets; rank 0 counts their byte ranges; only rank 0
    writes non-weight files, finalizes or removes the staging directory."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    a, b = torch.arange(6, dtype=torch.float32), torch.ones(2, 3, dtype=torch.bfloat16)
    w0 = CheckpointWriter(tmp_path / "out", max_shard_size=16)
    w0.plan([TensorSpec.of("a", a), TensorSpec.of("b", b)])
    w1 = CheckpointWriter.join(w0.dst, w0.tmp)
    w1._adopt(w0.layout())  # what the collective plan() hands a joined writer
    assert w1.shards == w0.shards and len(w0.shards) == 2
    w1.write("b", b)
    w1.write_range("a", 0, a[:4])
    w0.write_range("a", 8, a[2:])  # overlaps rank 1's range with the same bytes: allowed across ranks
    w1.set_config(LlamaConfig())  # a no-op on a joined writer
    assert not (w0.tmp / "config.json").exists()
    with pytest.raises(RuntimeError):
        w1.finalize()
    w1.close_for_handoff()
    w1.abort()  # rank 1 never removes rank 0's files
    assert w0.tmp.exists()
    assert w0.missing() == ["a", "b"]
    w0.mark_written(w1.written_ranges())
    assert w0.missing() == []
    w0.set_config(LlamaConfig())
    w0.finalize()
    got = {**load_file(tmp_path / "out" / w0.shards[0]), **load_file(tmp_path / "out" / w0.shards[1])}
    assert torch.equal(got["a"], a) and torch.equal(got["b"], b)


def test_ranges_that_leave_a_gap_do_not_complete_a_tensor(tmp_path):
    a = torch.arange(6, dtype=torch.float32)
    w0 = CheckpointWriter(tmp_path / "out")
    w0.plan([TensorSpec.of("a", a)])
    w0.mark_written([("a", 0, 8), ("a", 12, 24)])
    assert w0.missing() == ["a"]
    w0.mark_written([("a", 4, 16)])
    assert w0.missing() == []
    w0.abort()
