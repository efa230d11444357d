"""The quant pass end to end on tiny models of several families, and on SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch

import weightsmith
from weightsmith.checkpoint.reader import Checkpoint
from weightsmith.eval.perplexity import divergence
from weightsmith.quant.quant_pass import GPTQ_AVG_BITS_NOTE, SYM_2BIT_NOTE


def _kl(a_path, b_path, text=None):
    """KL of B from A on held-out text of the calibration distribution (the tail of hamlet,
    which calibration with 16x64 tokens never reaches), or on random ids when no text is given."""
    if text is None:
        ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a_path)
        ids = torch.tensor(tok(text.read_text()[-20000:])["input_ids"][: 8 * 128]).view(8, 128)
    return divergence(weightsmith.load(a_path), weightsmith.load(b_path), ids)


@pytest.mark.parametrize("fam", ["llama", "qwen2", "qwen3", "gemma3_text", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_gptq_on_families_loads_and_beats_rtn(fam, tiny_model, cli, tmp_path, hamlet):
    src = tiny_model(fam)
    g, r = tmp_path / "gptq", tmp_path / "rtn"
    # the GPTQ format packs 3-bit zeros across out_features in 32s;
    # tiny MoE experts are 48/24 wide, tiny Gemma 3 has one 16-wide KV head
    bits = "3" if fam in ("llama", "qwen2", "qwen3") else "4"
    common = ["--bits", bits, "--group-size", "32"]
    res = cli(
        "quant",
        src,
        g,
        "--calib",
        hamlet,
        "--calib-samples",
        "16",
        "--calib-length",
        "64",
        "--min-expert-tokens",
        "8",
        *common,
    )
    assert res.code == 0, res
    assert cli("quant", src, r, "--method", "rtn", *common).code == 0
    m = json.loads((g / "manifest.json").read_text())
    assert m["calibration"]["sha256"] and m["metrics"]["quantized_modules"] > 0
    assert int(bits) < m["metrics"]["bits_per_quantized_weight"] < int(bits) + 1.5
    kl_g, kl_r = _kl(src, g, hamlet)["mean_kl"], _kl(src, r, hamlet)["mean_kl"]
    assert kl_g < kl_r, (kl_g, kl_r)
    model = AutoModel(g)
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False).shape == (1, 7)


def AutoModel(path):
    return weightsmith.load(path)


def test_moe_expert_fallback_and_router_kept(tiny_model, cli, tmp_path, hamlet):
    out = tmp_path / "o"
    assert (
        cli(
            "quant",
            tiny_model("mixtral"),
            out,
            "--calib",
            hamlet,
            "--calib-samples",
            "4",
            "--calib-length",
            "32",
            "--min-expert-tokens",
            "1000",
            "--format",
            "gptq",
        ).code
        == 0
    )
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert len(m["rtn_fallback_experts"]) == 2 * 4 * 3  # every expert projection of both layers
    assert "tokens_per_expert" in m["modules"]["model.layers.0.<experts>"]
    ck = Checkpoint(out)
    assert "model.layers.0.block_sparse_moe.gate.weight" in ck  # routers stay full precision
    assert "model.layers.0.block_sparse_moe.experts.3.w2.qweight" in ck


def test_overrides_and_group_fallback(tiny_model, cli, tmp_path):
    out = tmp_path / "o"
    r = cli(
        "quant",
        tiny_model("llama"),
        out,
        "--method",
        "rtn",
        "--group-size",
        "64",
        "--format",
        "gptq",
        "--override",
        r"mlp\.down_proj:skip",
        "--override",
        r"layers\.1\.self_attn\.q_proj:bits=8,group_size=32",
    )
    assert r.code == 0, r
    ck = Checkpoint(out)
    assert "model.layers.0.mlp.down_proj.weight" in ck and "model.layers.0.mlp.down_proj.qweight" not in ck
    assert ck.info("model.layers.1.self_attn.q_proj.qweight").shape == (64 * 8 // 32, 64)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    # one rule for the family every layer shares, one per module where layers differ
    assert "-:^model\\.layers\\.\\d+\\.mlp\\.down_proj$" in qc["dynamic"] and len(qc["dynamic"]) == 2
    assert qc["dynamic"]["+:^model\\.layers\\.1\\.self_attn\\.q_proj$"]["bits"] == 8
    m = weightsmith.load(out)
    assert isinstance(m.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert m.model.layers[1].self_attn.q_proj.bits == 8


def test_group_mismatch_modes(tiny_model, cli, tmp_path):
    src = tiny_model("llama")  # down_proj has in_features 96: 64 does not divide it
    r = cli("quant", src, tmp_path / "e", "--method", "rtn", "--group-size", "64", "--group-mismatch", "error")
    assert (
        r.code == 2
        and "model.layers.0.mlp.down_proj: group size 64 does not divide in_features 96" in r.err
        and "32" in r.err
    )
    assert not (tmp_path / "e").exists()
    r = cli("quant", src, tmp_path / "f", "--method", "rtn", "--group-size", "64", "--json")
    adj = json.loads((tmp_path / "f" / "manifest.json").read_text())["metrics"]["group_adjustments"]
    assert adj == {f"model.layers.{i}.mlp.down_proj": "group 64 -> 32: 64 does not divide 96" for i in range(2)}
    assert (
        cli(
            "quant",
            src,
            tmp_path / "g",
            "--method",
            "rtn",
            "--group-size",
            "64",
            "--group-mismatch",
            "ragged",
            "--format",
            "gptq",
        ).code
        == 0
    )
    ck = Checkpoint(tmp_path / "g")
    assert ck.info("model.layers.0.mlp.down_proj.scales").shape == (2, 64)  # ceil(96 / 64) groups
    assert torch.equal(ck.get("model.layers.0.mlp.down_proj.g_idx"), torch.arange(96, dtype=torch.int32) // 64)
    r = cli(
        "quant",
        src,
        tmp_path / "h",
        "--method",
        "rtn",
        "--group-size",
        "64",
        "--group-mismatch",
        "ragged",
        "--format",
        "compressed-tensors",
    )
    assert r.code == 2 and "cannot store ragged groups" in r.err


def test_unsupported_shapes_and_bad_weights(tiny_model, cli, tmp_path):
    src = tiny_model("llama", hidden_size=48, head_dim=12, intermediate_size=80)
    r = cli("quant", src, tmp_path / "o", "--method", "rtn", "--bits", "3", "--group-size", "-1", "--format", "gptq")
    assert r.code == 2 and "in_features 48 cannot be packed at 3 bits" in r.err and "--override" in r.err
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model("llama"), bad)
    t = load_file(bad / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
    r = cli("quant", bad, tmp_path / "o2", "--method", "rtn")
    assert (
        r.code == 1
        and "model.layers.1.mlp.up_proj.weight: contains NaN or Inf" in r.err
        and not (tmp_path / "o2").exists()
    )


def test_deterministic(tiny_model, cli, tmp_path, hamlet):
    args = ["--calib", hamlet, "--calib-samples", "4", "--calib-length", "32"]
    assert cli("quant", tiny_model("qwen3"), tmp_path / "a", *args).code == 0
    assert cli("quant", tiny_model("qwen3"), tmp_path / "b", *args).code == 0
    for p in (tmp_path / "a").iterdir():
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes(), p.name


def test_dry_run_and_inspect(tiny_model, cli, tmp_path):
    r = cli("quant", tiny_model("llama"), tmp_path / "o", "--dry-run", "--json")
    plan = json.loads(r.out)["plan"]
    assert plan["quantized_modules"] == 14 and plan["output_bytes"] < 200_000 and not (tmp_path / "o").exists()
    assert cli("quant", tiny_model("llama"), tmp_path / "o", "--method", "rtn").code == 0
    info = json.loads(cli("inspect", tmp_path / "o", "--json").out)
    assert (
        info["quantization"] == "compressed-tensors"
        and info["parameters"] == json.loads(cli("inspect", tiny_model("llama"), "--json").out)["parameters"]
    )


def test_symmetric_2_bit_note(tiny_model, cli, tmp_path):
    """A symmetric 2-bit grid gets one line pointing at --no-sym (measured far better at 2 bits); 3 bits
    and asymmetric 2 bits get none."""
    base = ["--method", "rtn", "--group-size", "32", "--dry-run"]
    for extra, expected in ((["--bits", "2"], 1), (["--bits", "2", "--no-sym"], 0), (["--bits", "3"], 0)):
        r = cli("quant", tiny_model("llama"), tmp_path / "o", *base, *extra)
        assert r.code == 0, r
        assert r.err.splitlines().count(f"note: {SYM_2BIT_NOTE}") == expected, (extra, r.err)


@pytest.mark.slow
def test_smollm2_gptq_beats_rtn(smollm2, cli, tmp_path, hamlet):
    from weightsmith.assets import political_speeches

    calib = [
        "--calib",
        political_speeches(),
        "--calib-field",
        "speeches",
        "--calib-samples",
        "32",
        "--calib-length",
        "512",
    ]
    # GPTQ on the first 4 of 30 layers only (the others stay fp32 in both models, and GPTQ's engine
    # stops after layer 3): the real model and data at a seventh of the cost. Measured at commit
    # time: fp32 38.39, GPTQ 44.99, RTN 52.34 (4 Hamlet windows).
    first4 = ["--override", r"model\.layers\.([4-9]|[12][0-9])\.:skip"]
    g, r = tmp_path / "g", tmp_path / "r"
    assert cli("quant", smollm2, g, "--bits", "3", "--group-size", "64", *calib, *first4).code == 0
    assert cli("quant", smollm2, r, "--method", "rtn", "--bits", "3", "--group-size", "64", *first4).code == 0
    assert json.loads((g / "manifest.json").read_text())["metrics"]["quantized_modules"] == 4 * 7
    ppl = {}
    for name, path in (("gptq", g), ("rtn", r)):
        res = cli("eval", path, "--text", hamlet, "--windows", "4", "--json")
        ppl[name] = json.loads(res.out)["perplexity"]
    assert ppl["gptq"] < 0.9 * ppl["rtn"], ppl


def test_fp_target_gptq(tiny_model, cli, tmp_path, hamlet):
    """--fp-target (GPTAQ): every non-first-layer module gets the full-precision target; beats RTN."""
    src = tiny_model("qwen2")
    common = ["--bits", "3", "--group-size", "32"]
    assert (
        cli(
            "quant",
            src,
            tmp_path / "a",
            "--fp-target",
            "--calib",
            hamlet,
            "--calib-samples",
            "16",
            "--calib-length",
            "64",
            *common,
        ).code
        == 0
    )
    assert cli("quant", src, tmp_path / "r", "--method", "rtn", *common).code == 0
    mods = json.loads((tmp_path / "a" / "manifest.json").read_text())["metrics"]["modules"]
    assert {v["method"] for v in mods.values()} == {"gptq (full-precision target)"}
    assert _kl(src, tmp_path / "a", hamlet)["mean_kl"] < _kl(src, tmp_path / "r", hamlet)["mean_kl"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_rtn_honours_device_and_writes_the_cpu_bytes(tiny_model, cli, tmp_path):
    """`--device cuda` runs RTN on the GPU (it used to be ignored); the rounding is the same as on the CPU."""
    src = tiny_model("llama")
    for dev in ("cpu", "cuda"):
        r = cli("quant", src, tmp_path / dev, "--method", "rtn", "--bits", "4", "--group-size", "32", "--device", dev)
        assert r.code == 0, r
    cpu, cuda = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("cpu", "cuda"))
    assert cpu == cuda


def test_avg_bits_mixed_precision(tiny_model, cli, tmp_path, hamlet):
    """--avg-bits: per-module widths from measured sensitivity, within the bytes of the uniform model,
    recorded in the manifest, honoured by GPTQ and by the loader; fused q/k/v and gate/up agree. Quality:
    not broken against uniform 3 bits at the same bytes (measured at commit time, mean KL from the
    source: 7.9e-5 mixed with --sensitivity layer vs 8.1e-5 uniform; a wrongly packed width is orders
    of magnitude worse). On SmolLM2 it beat uniform with RTN but not with GPTQ (docs/quantization.md)."""
    src = tiny_model("llama")
    common = ["--group-size", "32", "--format", "gptq", "--calib", hamlet, "--calib-samples", "16"]
    common += ["--calib-length", "64"]
    r = cli("quant", src, tmp_path / "mix", "--avg-bits", "3", "--sensitivity", "layer", *common)
    assert r.code == 0, r
    # GPTQ + --avg-bits: one line saying it measured worse than uniform (none without --avg-bits or with RTN)
    assert [n for n in r.err.splitlines() if "--avg-bits with --method gptq" in n] == [f"note: {GPTQ_AVG_BITS_NOTE}"]
    r = cli("quant", src, tmp_path / "uni", "--bits", "3", *common)
    assert r.code == 0 and "--avg-bits" not in r.err, r
    mix = json.loads((tmp_path / "mix" / "manifest.json").read_text())
    uni = json.loads((tmp_path / "uni" / "manifest.json").read_text())["metrics"]
    mp = mix["metrics"]["mixed_precision"]
    assert mix["parameters"]["avg_bits"] == 3.0
    assert mp["budget_bytes"] == uni["quantized_linear_bytes"] == mp["uniform_bytes"]["3"]
    assert mp["bytes"] == mix["metrics"]["quantized_linear_bytes"] <= mp["budget_bytes"]
    assert len(mp["modules_per_bits"]) >= 2, mp["modules_per_bits"]
    assert mp["estimated_error"] < mp["estimated_error_uniform_3_bits"]
    bits = {p: v["bits"] for p, v in mix["metrics"]["modules"].items() if "bits" in v}
    assert len(bits) == 14
    for i in range(2):
        a = f"model.layers.{i}.self_attn."
        assert bits[a + "q_proj"] == bits[a + "k_proj"] == bits[a + "v_proj"]
        assert bits[f"model.layers.{i}.mlp.gate_proj"] == bits[f"model.layers.{i}.mlp.up_proj"]
    ck = Checkpoint(tmp_path / "mix")
    model = weightsmith.load(tmp_path / "mix")
    for p, b in bits.items():
        n = ck.info(p + ".scales").shape[1]
        assert ck.info(p + ".qzeros").shape[1] == n * b // 32  # packed at the chosen width
        assert dict(model.named_modules())[p].bits == b
    kl_mix, kl_uni = _kl(src, tmp_path / "mix", hamlet)["mean_kl"], _kl(src, tmp_path / "uni", hamlet)["mean_kl"]
    assert kl_mix < 1.5 * kl_uni, (kl_mix, kl_uni)


def test_avg_bits_infeasible_and_dry_run(tiny_model, cli, tmp_path, hamlet):
    # down_proj (72 inputs) and gate/up (72 outputs) cannot be packed at 2 bits in the gptq format
    src = tiny_model("llama", intermediate_size=72)
    common = ["--method", "rtn", "--group-size", "32", "--format", "gptq", "--calib", hamlet]
    common += ["--calib-samples", "4", "--calib-length", "32"]
    r = cli("quant", src, tmp_path / "x", "--avg-bits", "2", *common)
    assert r.code == 2 and "--avg-bits 2:" in r.err and "minimum feasible value is" in r.err, r.err
    assert not (tmp_path / "x").exists()
    lowest = r.err.split("minimum feasible value is ")[1].split()[0]
    assert 2 < float(lowest) < 4
    r = cli("quant", src, tmp_path / "x", "--avg-bits", lowest, "--dry-run", "--json", *common)
    assert r.code == 0 and json.loads(r.out)["plan"]["avg_bits"] == float(lowest) and not (tmp_path / "x").exists()
    r = cli("quant", src, tmp_path / "x", "--avg-bits", lowest, *common)
    assert r.code == 0 and "--avg-bits with --method gptq" not in r.err, r
    mp = json.loads((tmp_path / "x" / "manifest.json").read_text())["metrics"]["mixed_precision"]
    assert mp["bytes"] <= mp["budget_bytes"] and mp["modules_per_bits"]["2"] == 8  # q/k/v/o at 2 bits, MLP at 4


@pytest.mark.slow
def test_smollm2_rtn_avg_bits_beats_uniform(smollm2, cli, tmp_path, hamlet):
    """RTN at 3 bits on SmolLM2's first 4 layers (the others stay fp32): --avg-bits 3 spends the same
    bytes as uniform 3 bits and loses less perplexity (measured at commit time: 49.87 vs 52.34 on 4 Hamlet
    windows; the bench's full-model result: 4.07x vs 5.72x source perplexity)."""
    first4 = ["--override", r"model\.layers\.([4-9]|[12][0-9])\.:skip"]
    common = ["--method", "rtn", "--group-size", "64", *first4]
    from weightsmith.assets import political_speeches

    calib = ["--calib", political_speeches(), "--calib-field", "speeches", "--calib-samples", "8"]
    calib += ["--calib-length", "128"]
    mix, uni = tmp_path / "mix", tmp_path / "uni"
    assert cli("quant", smollm2, mix, "--avg-bits", "3", *common, *calib).code == 0
    assert cli("quant", smollm2, uni, "--bits", "3", *common).code == 0
    m = json.loads((mix / "manifest.json").read_text())["metrics"]
    u = json.loads((uni / "manifest.json").read_text())["metrics"]
    assert m["quantized_linear_bytes"] <= u["quantized_linear_bytes"] == m["mixed_precision"]["budget_bytes"]
    ppl = {}
    for name, path in (("mix", mix), ("uni", uni)):
        res = cli("eval", path, "--text", hamlet, "--windows", "4", "--json")
        ppl[name] = json.loads(res.out)["perplexity"]
    assert ppl["mix"] < 0.98 * ppl["uni"], ppl
