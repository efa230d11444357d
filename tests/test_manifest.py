"""Manifest: contents, verify, freshness (Makefile-friendly skip), determinism, chain."""

from __future__ import annotations

import json

from weightsmith.checkpoint import manifest as mf


def test_manifest_contents(tiny_model, cli, tmp_path):
    out = tmp_path / "o"
    assert cli("import", tiny_model("llama"), out).code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["tool"]["name"] == "weightsmith" and m["pass"]["name"] == "import"
    assert m["parameters"] == {"dtype": "keep", "dequantize_fp8": False}
    assert set(m["inputs"][0]["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert set(m["outputs"]["files"]) == {p.name for p in out.iterdir()} - {"manifest.json"}
    assert m["environment"]["torch"] and m["environment"]["transformers"]
    assert "created" not in json.dumps(m)  # no timestamps: equal runs give equal bytes
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card


def test_verify_detects_tampering(tiny_model, cli, tmp_path):
    out = tmp_path / "o"
    assert cli("import", tiny_model("llama"), out).code == 0
    assert mf.verify(out) == []
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    (out / "extra.txt").write_text("x")
    (out / "tokenizer.json").unlink()
    problems = mf.verify(out)
    assert any("model.safetensors: sha256" in p for p in problems)
    assert any("extra.txt: present but not listed" in p for p in problems)
    assert any("tokenizer.json: listed in the manifest but missing" in p for p in problems)
    r = cli("verify", out)
    assert r.code == 1 and "verification failed" in r.err


def test_freshness_and_force(tiny_model, cli, tmp_path):
    out = tmp_path / "o"
    assert cli("import", tiny_model("llama"), out).code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    r = cli("import", tiny_model("llama"), out)
    assert r.code == 0 and "up to date" in r.err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    r = cli("import", tiny_model("llama"), out, "--dtype", "bfloat16")
    assert r.code == 1 and "already exists" in r.err and "--force" in r.err
    r = cli("import", tiny_model("llama"), out, "--dtype", "bfloat16", "--force")
    assert r.code == 0
    assert json.loads((out / "manifest.json").read_text())["parameters"]["dtype"] == "bfloat16"


def test_rerun_is_byte_identical(tiny_model, cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("import", tiny_model("qwen2"), a, "--max-shard-size", "20KB").code == 0
    assert cli("import", tiny_model("qwen2"), b, "--max-shard-size", "20KB").code == 0
    assert len(list(a.glob("*.safetensors"))) > 1
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def test_chain_accumulates(tiny_model, cli, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli("import", tiny_model("llama"), one).code == 0
    assert cli("import", one, two, "--dtype", "float16").code == 0
    m = json.loads((two / "manifest.json").read_text())
    assert [s["pass"]["name"] for s in m["chain"]] == ["import"]
    assert m["chain"][0]["outputs"] == json.loads((one / "manifest.json").read_text())["outputs"]
    r = cli("inspect", two)
    assert r.code == 0 and "provenance" in r.out


def test_recipe_file_and_cli_precedence(tiny_model, cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("dtype: float16\n")
    out = tmp_path / "o"
    assert cli("import", tiny_model("llama"), out, "--recipe", recipe).code == 0
    assert json.loads((out / "manifest.json").read_text())["parameters"]["dtype"] == "float16"
    out2 = tmp_path / "o2"
    assert cli("import", tiny_model("llama"), out2, "--recipe", recipe, "--dtype", "bfloat16").code == 0
    assert json.loads((out2 / "manifest.json").read_text())["parameters"]["dtype"] == "bfloat16"
    recipe.write_text("dtyp: float16\n")
    r = cli("import", tiny_model("llama"), tmp_path / "o3", "--recipe", recipe)
    assert r.code == 2 and "dtyp" in r.err and not (tmp_path / "o3").exists()


def test_dry_run_writes_nothing(tiny_model, cli, tmp_path):
    out = tmp_path / "o"
    r = cli("import", tiny_model("mixtral"), out, "--dry-run", "--dtype", "bfloat16", "--json")
    assert r.code == 0, r
    res = json.loads(r.out)
    assert res["status"] == "dry-run" and res["plan"]["tensors"] > 0 and res["plan"]["cast"] == res["plan"]["tensors"]
    assert not out.exists()


def test_eval_text_recorded(tiny_model, cli, tmp_path, hamlet):
    out = tmp_path / "o"
    r = cli("import", tiny_model("qwen3"), out, "--eval-text", hamlet, "--eval-windows", "2", "--eval-length", "32")
    assert r.code == 0, r
    m = json.loads((out / "manifest.json").read_text())
    assert m["parameters"]["eval"] == {"text": str(hamlet), "windows": 2, "length": 32}
    ppl = m["metrics"]["perplexity"]
    assert ppl["text"] == "hamlet.txt" and ppl["windows"] == 2 and 100 < ppl["perplexity"] < 500
    assert mf.verify(out) == []
