"""inspect / import / verify / eval / diff on tiny models of all ten families."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

from weightsmith.checkpoint.reader import Checkpoint


def test_inspect(family, tiny_model, cli):
    r = cli("inspect", tiny_model(family), "--json")
    assert r.code == 0, r
    info = json.loads(r.out)
    assert info["family"] == family and info["supported"]
    assert info["coverage"] == {"missing": [], "unexpected": []}
    assert info["kv_cache"]["values_per_token"] > 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model(family))
    assert info["parameters"] == sum(
        v.numel() for v in model.state_dict().values()
    )  # buffers like e_score_correction_bias included
    r = cli("inspect", tiny_model(family))  # the human table renders too
    assert r.code == 0 and family in r.out


def test_import_verify_eval_diff(family, tiny_model, cli, tmp_path, hamlet):
    src = tiny_model(family)
    out = tmp_path / "copy"
    r = cli("import", src, out, "--json")
    assert r.code == 0, r
    assert json.loads(r.out)["status"] == "written"
    ck_src, ck_out = Checkpoint(src), Checkpoint(out)
    assert ck_src.names == ck_out.names
    for n in ck_src.names:
        assert torch.equal(ck_src.get(n), ck_out.get(n)), n
    r = cli("verify", out)
    assert r.code == 0 and "ok" in r.out, r
    r = cli("eval", out, "--text", hamlet, "--length", "64", "--windows", "2", "--json")
    assert r.code == 0, r
    res = json.loads(r.out)
    # a random byte-level model is near-uniform over 256 tokens: perplexity close to 256
    assert 150 < res["perplexity"] < 400 and res["tokens"] == 2 * 63
    r = cli("diff", src, out, "--text", hamlet, "--length", "64", "--windows", "2", "--json")
    assert r.code == 0, r
    d = json.loads(r.out)
    assert d["max_abs_logit_diff"] == 0.0 and d["top1_agreement"] == 1.0 and abs(d["mean_kl"]) < 1e-7


def test_dtype_cast_and_loads(tiny_model, cli, tmp_path):
    out = tmp_path / "bf16"
    r = cli("import", tiny_model("qwen2"), out, "--dtype", "bfloat16")
    assert r.code == 0, r
    ck = Checkpoint(out)
    assert {ck.info(n).dtype for n in ck.names} == {torch.bfloat16}
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.dtype == torch.bfloat16
    src = AutoModelForCausalLM.from_pretrained(tiny_model("qwen2"))
    for (n, a), (_, b) in zip(src.state_dict().items(), m.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16), b), n
