"""Every bad input: exit 1, one clear line naming the problem, and no output left behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import leftovers


def _sharded_copy(src, dst):
    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.checkpoint.writer import CheckpointWriter, TensorSpec

    ck = Checkpoint(src)
    with CheckpointWriter(dst, max_shard_size=30_000) as w:
        w.plan([TensorSpec(i.name, i.shape, i.dtype) for i in ck.infos()])
        for n in ck.names:
            w.write(n, ck.get(n))
        w.set_config(ck.config)
        w.copy_aux_files(src, ck.aux_files())
        w.finalize()
    assert len(list(dst.glob("*.safetensors"))) > 2
    return dst


def _expect_failure(cli, src, tmp_path, pattern):
    dst = tmp_path / "out"
    r = cli("import", src, dst)
    assert r.code == 1, r
    lines = [l for l in r.err.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.err
    assert pytest.importorskip("re").search(pattern, lines[0]), lines[0]
    assert not dst.exists() and leftovers(tmp_path, "out") == []
    return lines[0]


@pytest.fixture
def sharded(tiny_model, tmp_path):
    return _sharded_copy(tiny_model("llama"), tmp_path / "src")


def test_truncated_shard(sharded, cli, tmp_path):
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    _expect_failure(cli, sharded, tmp_path, rf"{shard.name}.*truncated")


def test_corrupt_header(sharded, cli, tmp_path):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:12] = b"@@@@"
    shard.write_bytes(bytes(data))
    _expect_failure(cli, sharded, tmp_path, rf"{shard.name}.*corrupt")


def test_index_pointing_outside(sharded, cli, tmp_path):
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = next(iter(idx["weight_map"]))
    idx["weight_map"][first] = "../../etc/passwd"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(idx))
    _expect_failure(cli, sharded, tmp_path, r"not a plain file name inside")


def test_missing_tensor(sharded, cli, tmp_path):
    # a shard rewritten without one of its tensors, index unchanged
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    name, fname = next(iter(sorted(idx["weight_map"].items())))
    from safetensors.torch import load_file

    tensors = load_file(sharded / fname)
    del tensors[name]
    save_file(tensors, sharded / fname, metadata={"format": "pt"})
    _expect_failure(cli, sharded, tmp_path, rf"'{name}'.*missing")


def test_missing_tensor_the_config_implies(tiny_model, cli, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), src)
    from safetensors.torch import load_file

    t = load_file(src / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    _expect_failure(cli, src, tmp_path, r"missing tensor 'model.layers.1.mlp.up_proj.weight'.*config.json implies")


def test_duplicate_tensor(sharded, cli, tmp_path):
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    names = sorted(idx["weight_map"])
    a, b = names[0], names[-1]
    fb = idx["weight_map"][b]
    from safetensors.torch import load_file

    tb = load_file(sharded / fb)
    tb[a] = torch.zeros(1)
    save_file(tb, sharded / fb, metadata={"format": "pt"})
    _expect_failure(cli, sharded, tmp_path, rf"'{a}'")


def test_unsupported_architecture(tmp_path, cli):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(src)
    line = _expect_failure(cli, src, tmp_path, r"model_type 'gpt2' is not supported")
    assert "llama" in line and "deepseek_v3" in line


def test_output_already_exists(tiny_model, cli, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    r = cli("import", tiny_model("llama"), dst)
    assert r.code == 1 and "already exists" in r.err and "--force" in r.err
    assert (dst / "keep.txt").read_text() == "mine" and leftovers(tmp_path, "out") == []


def test_failure_injected_midway(tiny_model, cli, tmp_path, monkeypatch):
    from weightsmith.checkpoint import writer as wmod

    calls = {"n": 0}

    def flaky(orig):  # the disk fills on the 5th tensor, whichever way it is written (bytes or in-kernel copy)
        def f(self, *args):
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(28, "No space left on device")
            return orig(self, *args)

        return f

    for meth in ("write_bytes", "copy_from"):
        monkeypatch.setattr(wmod.CheckpointWriter, meth, flaky(getattr(wmod.CheckpointWriter, meth)))
    dst = tmp_path / "out"
    r = cli("import", tiny_model("llama"), dst)
    assert r.code == 1 and "No space left" in r.err
    assert not dst.exists() and leftovers(tmp_path, "out") == []


def test_failure_midway_keeps_previous_output(tiny_model, cli, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    assert cli("import", tiny_model("llama"), dst).code == 0
    before = (dst / "manifest.json").read_bytes()
    from weightsmith.checkpoint import writer as wmod

    monkeypatch.setattr(wmod.CheckpointWriter, "write_bytes", lambda *a: (_ for _ in ()).throw(OSError(5, "I/O error")))
    r = cli("import", tiny_model("llama"), dst, "--force", "--dtype", "bfloat16")
    assert r.code == 1
    assert (dst / "manifest.json").read_bytes() == before and leftovers(tmp_path, "out") == []


def test_usage_errors_exit_2(cli, tiny_model, tmp_path):
    r = cli("import", tiny_model("llama"), tmp_path / "o", "--dtype", "int3")
    assert r.code == 2 and not (tmp_path / "o").exists()
    r = cli("eval", tiny_model("llama"), "--text", tmp_path / "nope.txt")
    assert r.code == 2 and "no such text file" in r.err


def test_eval_text_takes_the_embedded_hamlet_by_name(tiny_model, cli, hamlet):
    from weightsmith.eval.text import read_text

    assert read_text("demo:hamlet") == Path(hamlet).read_text(encoding="utf-8")
    r = cli("eval", tiny_model("llama"), "--text", "demo:nope", "--windows", "1")
    assert r.code != 0 and "unknown embedded text; available: demo:hamlet" in r.err
