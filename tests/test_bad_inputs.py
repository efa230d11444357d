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
    lines = message_lines(r.err)
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
    assert r.code == 1 and "exists and is not a weightsmith output" in r.err and "--force" in r.err
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


# ---- validation: every case is one line, exit 1 (bad input) or 2 (bad usage), nothing written,
# inputs byte-identical ------------------------------------------------------------------------------
from badcase import error_line, message_lines, no_complete_output, tree_digest  # noqa: E402


@pytest.fixture(scope="module")
def llama_src(tiny_model, tmp_path_factory):
    src = tmp_path_factory.mktemp("bad") / "src"
    shutil.copytree(tiny_model("llama"), src)
    return src


@pytest.fixture(scope="module")
def gptq_out(llama_src, tmp_path_factory):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("bad") / "w4"
    r = run_cli("quant", llama_src, out, "--method", "rtn", "--group-size", "32")
    assert r.code == 0, r
    return out


def _edited_copy(src, dst, **config):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _refused(cli, args, code, *patterns, inputs=(), dst=None):
    before = tree_digest(*inputs)
    line = error_line(cli(*args), code, *patterns)
    if dst is not None:
        no_complete_output(dst)
        assert not Path(dst).exists()
    assert tree_digest(*inputs) == before
    return line


@pytest.mark.parametrize("command", ["import", "quant", "prune", "eval"])
def test_tensor_shapes_are_checked_against_the_config(llama_src, cli, tmp_path, command, hamlet):
    bad = _edited_copy(llama_src, tmp_path / "bad", intermediate_size=80)  # weights are 96 wide
    dst = tmp_path / "out"
    args = {
        "import": ("import", bad, dst),
        "quant": ("quant", bad, dst, "--method", "rtn", "--group-size", "32"),
        "prune": ("prune", bad, dst, "--ffn", "64", "--importance", "magnitude"),
        "eval": ("eval", bad, "--text", hamlet, "--windows", "1", "--length", "16"),
    }[command]
    _refused(
        cli,
        args,
        1,
        r"tensor 'model\.layers\.0\.mlp\.(down|gate|up)_proj\.weight' \(model.safetensors\) has shape \[\d+, \d+\], "
        r"but config.json implies",
        "do not belong together",
        inputs=[bad],
        dst=dst,
    )


def test_verify_checks_shapes_against_the_config(llama_src, cli, tmp_path):
    """A config.json edited after writing, with the manifest re-hashed and re-sealed by hand to
    match, is still caught: verify checks every tensor's shape against the config."""
    from weightsmith.checkpoint import manifest as mf

    out = tmp_path / "out"
    assert cli("import", llama_src, out).code == 0
    cfg = json.loads((out / "config.json").read_text())
    cfg["intermediate_size"] = 80
    (out / "config.json").write_text(json.dumps(cfg))
    m = json.loads((out / "manifest.json").read_text())
    m["outputs"]["files"]["config.json"] = {
        "sha256": mf.sha256_file(out / "config.json", use_cache=False),
        "bytes": (out / "config.json").stat().st_size,
    }
    (out / "manifest.json").write_text(json.dumps(mf.seal({k: v for k, v in m.items() if k != mf.SELF_KEY})))
    r = cli("verify", out)
    assert (
        r.code == 1
        and "mlp.down_proj.weight' (model.safetensors) has shape [64, 96], but config.json implies [64, 80]" in r.err
    ), r


def test_zero_attention_heads(llama_src, cli, tmp_path):
    bad = _edited_copy(llama_src, tmp_path / "bad", num_attention_heads=0)
    _refused(
        cli,
        ("import", bad, tmp_path / "out"),
        1,
        "num_attention_heads",
        "positive integer",
        inputs=[bad],
        dst=tmp_path / "out",
    )


@pytest.mark.parametrize(
    "args, pattern",
    [
        (("minitron", "--top-k", "0", "--distill-tokens", "64"), r"--top-k 0: must be >= 1"),
        (("minitron", "--max-width-pruning", "1.5"), r"--max-width-pruning 1.5: must be >= 0 and < 1"),
        (("prune", "--ffn", "0"), r"--ffn 0: must be >= 1"),
        (("prune", "--hidden", "0"), r"--hidden 0: must be >= 1"),
        (("prune",), r"prune needs a target: give --params, --hidden, --ffn"),
        (("import", "--max-shard-size", "abc"), r"--max-shard-size: cannot parse size 'abc'; write e.g. 5GB"),
        (("import", "--max-shard-size", "0"), r"--max-shard-size 0: must be a positive size"),
        (("import", "--device", "banana"), r"--device banana: not a device; use cpu, cuda or cuda:N"),
        (("quant", "--method", "rtn", "--device", "banana"), r"--device banana: not a device"),
        (
            ("quant", "--method", "rtn", "--group-size", "32", "--override", "nothing_is_called_this:skip"),
            r"--override 'nothing_is_called_this:skip': matches no linear module",
        ),
    ],
    ids=[
        "minitron-top-k-0",
        "minitron-width-1.5",
        "prune-ffn-0",
        "prune-hidden-0",
        "prune-no-target",
        "shard-abc",
        "shard-0",
        "device-banana",
        "rtn-device-banana",
        "override-no-match",
    ],
)
def test_bad_options_exit_2(llama_src, cli, tmp_path, args, pattern):
    dst = tmp_path / "out"
    _refused(cli, (args[0], llama_src, dst, *args[1:]), 2, pattern, inputs=[llama_src], dst=dst)


def test_cuda_without_cuda(llama_src, cli, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _refused(
        cli,
        ("import", llama_src, tmp_path / "out", "--device", "cuda"),
        2,
        r"--device cuda: CUDA is not available here.*use --device cpu",
        inputs=[llama_src],
        dst=tmp_path / "out",
    )
    _refused(
        cli,
        ("eval", llama_src, "--text", "demo:hamlet", "--device", "cuda"),
        2,
        r"--device cuda: CUDA is not available",
    )


@pytest.mark.parametrize("command", ["quant", "prune", "import"])
def test_quantized_input_says_already_quantized(gptq_out, cli, tmp_path, command):
    args = {"quant": ("quant", "--method", "rtn"), "prune": ("prune", "--ffn", "64"), "import": ("import",)}[command]
    _refused(
        cli,
        (args[0], gptq_out, tmp_path / "out", *args[1:]),
        2,
        r"w4: already quantized \((gptq|compressed-tensors)",
        "needs the unquantized model",
        inputs=[gptq_out],
        dst=tmp_path / "out",
    )


def test_inf_input_is_named_not_a_later_tensor(llama_src, cli, tmp_path):
    from safetensors.torch import load_file

    bad = tmp_path / "bad"
    shutil.copytree(llama_src, bad)
    t = load_file(bad / "model.safetensors")
    t["model.layers.0.mlp.down_proj.weight"][3, 5] = float("inf")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    for args in (
        ("mla", bad, tmp_path / "out", "--calib", "demo:hamlet", "--calib-samples", "2", "--calib-length", "32"),
        ("quant", bad, tmp_path / "out", "--method", "rtn", "--group-size", "32"),
    ):
        _refused(
            cli,
            args,
            1,
            r"input tensor model\.layers\.0\.mlp\.down_proj\.weight: contains NaN or Inf",
            "damaged",
            inputs=[bad],
            dst=tmp_path / "out",
        )


def test_malformed_gguf_with_huge_counts(cli, tmp_path):
    import struct

    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**40, 2**40) + b"\0" * 64)
    _refused(
        cli,
        ("import", g, tmp_path / "out"),
        1,
        r"m\.gguf: GGUF header claims 1099511627776 tensors",
        "damaged or truncated",
        inputs=[g],
        dst=tmp_path / "out",
    )
    g.write_bytes(b"nope" * 10)
    _refused(cli, ("import", g, tmp_path / "out"), 1, r"m\.gguf: not a GGUF file", inputs=[g], dst=tmp_path / "out")


# ---- cases that already held (kept so they keep holding) ----------------------------------------
def test_missing_source(cli, tmp_path):
    _refused(
        cli, ("import", tmp_path / "nope", tmp_path / "out"), 1, "nope: no such directory or file", dst=tmp_path / "out"
    )


def test_source_is_a_plain_file(cli, tmp_path):
    f = tmp_path / "weights.txt"
    f.write_text("x")
    _refused(
        cli,
        ("import", f, tmp_path / "out"),
        1,
        "is a file; give a checkpoint directory, a .gguf file or a Hub id",
        inputs=[f],
        dst=tmp_path / "out",
    )


def test_uncached_hub_id(cli, tmp_path):
    _refused(
        cli,
        ("import", "nobody-here/no-such-model", tmp_path / "out"),
        1,
        "not in the local Hugging Face cache",
        "--allow-download",
        dst=tmp_path / "out",
    )


def test_no_config_json(llama_src, cli, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_src, bad)
    (bad / "config.json").unlink()
    _refused(cli, ("import", bad, tmp_path / "out"), 1, "no config.json", inputs=[bad], dst=tmp_path / "out")


def test_config_json_not_json(llama_src, cli, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_src, bad)
    (bad / "config.json").write_text("{nope")
    _refused(
        cli, ("import", bad, tmp_path / "out"), 1, r"config.json: not valid JSON", inputs=[bad], dst=tmp_path / "out"
    )


def test_pickle_only_checkpoint_refused(llama_src, cli, tmp_path):
    from safetensors.torch import load_file

    bad = tmp_path / "bad"
    shutil.copytree(llama_src, bad)
    torch.save(load_file(bad / "model.safetensors"), bad / "pytorch_model.bin")
    (bad / "model.safetensors").unlink()
    _refused(
        cli,
        ("import", bad, tmp_path / "out"),
        1,
        "pickled .bin weights",
        "--allow-pickle",
        inputs=[bad],
        dst=tmp_path / "out",
    )


def test_no_weights(llama_src, cli, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama_src, bad)
    (bad / "model.safetensors").unlink()
    _refused(cli, ("import", bad, tmp_path / "out"), 1, "no weights found", inputs=[bad], dst=tmp_path / "out")


def test_unknown_choice_and_unknown_recipe_option(llama_src, cli, tmp_path):
    assert cli("quant", llama_src, tmp_path / "out", "--method", "rtnx").code == 2
    rec = tmp_path / "r.yaml"
    rec.write_text("bitz: 4\n")
    _refused(
        cli,
        ("quant", llama_src, tmp_path / "out", "--recipe", rec),
        2,
        "recipe option 'bitz' is not an option of this pass",
        inputs=[llama_src, rec],
        dst=tmp_path / "out",
    )


def test_dry_run_writes_nothing(llama_src, cli, tmp_path):
    before = tree_digest(llama_src)
    assert cli("quant", llama_src, tmp_path / "out", "--method", "rtn", "--group-size", "32", "--dry-run").code == 0
    assert not (tmp_path / "out").exists() and tree_digest(llama_src) == before


def test_verify_finds_a_changed_output_file(llama_src, cli, tmp_path):
    out = tmp_path / "out"
    assert cli("import", llama_src, out).code == 0
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(data))
    r = cli("verify", out)
    assert r.code == 1 and "model.safetensors: sha256" in r.err and "verification failed" in r.err
