"""The rotate pass: Hadamard constructions, and an fp model that computes the same logits after
norm folding + residual and per-head rotations (tiny models of several families, and SmolLM2)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.quant import rotation as rot


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 60, 64, 576, 896])
def test_hadamard_constructions(n):
    h = rot.hadamard(n)
    assert h is not None and set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=h.dtype))


@pytest.mark.parametrize("n", [64, 576, 100])
def test_rotation_is_orthogonal_and_seeded(n):
    q, kind = rot.rotation(n, seed=3)
    assert kind == ("random orthogonal" if n == 100 else "randomised Hadamard")
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=q.dtype), atol=1e-12)
    assert torch.equal(q, rot.rotation(n, seed=3)[0]) and not torch.equal(q, rot.rotation(n, seed=4)[0])


def test_head_rotations_cancel():
    """v_proj rows and o_proj columns rotated per head: the attention output is unchanged."""
    g = torch.Generator().manual_seed(0)
    wv, bv = torch.randn(32, 24, generator=g, dtype=torch.float64), torch.randn(32, generator=g, dtype=torch.float64)
    wo, x = torch.randn(24, 32, generator=g, dtype=torch.float64), torch.randn(5, 24, generator=g, dtype=torch.float64)
    r, _ = rot.rotation(16, 0)
    v, v2 = x @ wv.T + bv, x @ rot.heads_out(wv, r, 16).T + rot.heads_out(bv, r, 16)
    assert not torch.allclose(v, v2)
    assert torch.allclose(v2 @ rot.heads_in(wo, r, 16).T, v @ wo.T, atol=1e-10)


def _perturbed(src, dst, seed=1):
    """A copy of a tiny model whose norms and biases are far from their init (ones / zeros)."""
    shutil.copytree(src, dst)
    t = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for n in t:
        if "norm" in n or n.endswith(".bias"):
            t[n] = t[n] + torch.rand(t[n].shape, generator=g) * 0.5
    save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _max_logit_diff(a, b, ids):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(a).eval()(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(b).eval()(ids).logits
    return float((la - lb).abs().max()), float(la.abs().max())


@pytest.mark.parametrize(
    "fam,kw",
    [
        ("llama", {"attention_bias": True, "mlp_bias": True}),
        ("qwen2", {}),
        ("mistral", {}),
        ("qwen3", {}),
        ("llama", {"tie_word_embeddings": True}),
        ("mixtral", {}),
        ("deepseek_v3", {}),
    ],
    ids=["llama-biases", "qwen2", "mistral", "qwen3", "llama-tied", "mixtral", "deepseek_v3"],
)
def test_rotate_is_exact(fam, kw, tiny_model, cli, tmp_path):
    src = _perturbed(tiny_model(fam, **kw), tmp_path / "src")
    r = cli("rotate", src, tmp_path / "rot", "--json")
    assert r.code == 0, r
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    diff, scale = _max_logit_diff(src, tmp_path / "rot", ids)
    assert diff <= 1e-3 and scale > 0.1, (diff, scale)
    out = load_file(tmp_path / "rot" / "model.safetensors")
    norms = [
        n
        for n in out
        if n.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or n == "model.norm.weight"
    ]
    assert norms and all(torch.equal(out[n], torch.ones_like(out[n])) for n in norms)
    ref = load_file(src / "model.safetensors")
    assert not torch.allclose(out["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])
    cfg = json.loads((tmp_path / "rot" / "config.json").read_text())
    assert cfg["model_type"] == fam and "quantization_config" not in cfg
    m = json.loads((tmp_path / "rot" / "manifest.json").read_text())["metrics"]
    assert m["untied_lm_head"] == bool(kw.get("tie_word_embeddings"))
    if m["untied_lm_head"]:  # the final norm's scale lives in the new lm_head
        assert cfg["tie_word_embeddings"] is False and "lm_head.weight" in out


def test_tied_model_with_unit_final_norm_stays_tied(tiny_model, cli, tmp_path):
    src = tiny_model("llama", tie_word_embeddings=True)  # random init: every norm weight is 1
    assert cli("rotate", src, tmp_path / "rot").code == 0
    assert json.loads((tmp_path / "rot" / "config.json").read_text()).get("tie_word_embeddings") is True
    assert "lm_head.weight" not in load_file(tmp_path / "rot" / "model.safetensors")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    assert _max_logit_diff(src, tmp_path / "rot", ids)[0] <= 1e-3


def test_quant_rotate_quantizes_the_rotated_model(tiny_model, cli, tmp_path, hamlet):
    src = _perturbed(tiny_model("qwen2"), tmp_path / "src")
    assert cli("rotate", src, tmp_path / "rot").code == 0
    calib = ["--calib", hamlet, "--calib-samples", "8", "--calib-length", "64", "--bits", "4", "--group-size", "32"]
    assert cli("quant", src, tmp_path / "a", "--rotate", *calib).code == 0
    assert cli("quant", tmp_path / "rot", tmp_path / "b", *calib).code == 0
    # on the fly or from the written rotated model: the same bytes
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert m["parameters"]["rotate"] is True and m["metrics"]["rotation"]["residual_rotation"].startswith(
        "randomised Hadamard"
    )


@pytest.mark.slow
def test_rotate_smollm2_is_exact(smollm2, cli, tmp_path):
    r = cli("rotate", smollm2, tmp_path / "rot", "--json")
    assert r.code == 0, r
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2)("To be, or not to be, that is the question", return_tensors="pt")[
        "input_ids"
    ]
    diff, scale = _max_logit_diff(smollm2, tmp_path / "rot", ids)
    assert diff <= 1e-3 and scale > 5, (diff, scale)
    assert (
        json.loads((tmp_path / "rot" / "config.json").read_text())["tie_word_embeddings"] is False
    )  # SmolLM2 is tied; its final norm is not ones


def test_rotated_quantized_output_loads_in_compressed_tensors(tiny_model, cli, tmp_path):
    """A rotated + quantized model (untied lm_head) decompresses through compressed-tensors' own
    code to the same logits as weightsmith.load: no online transform is needed."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import weightsmith

    src = _perturbed(tiny_model("llama", tie_word_embeddings=True), tmp_path / "src")
    out = tmp_path / "ct"
    assert (
        cli(
            "quant",
            src,
            out,
            "--rotate",
            "--method",
            "rtn",
            "--format",
            "compressed-tensors",
            "--bits",
            "4",
            "--group-size",
            "32",
        ).code
        == 0
    )
    ref = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(run_compressed=False)
    ).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = ref(ids).logits, weightsmith.load(out)(ids).logits
    assert torch.allclose(theirs, ours, atol=1e-4)


# The W3 g64 quality floor on SmolLM2 (bounded protocol: 4x256 calibration tokens, 4 hamlet windows)
# for the best method measured (bench/quant.py, docs/quantization.md): GPTQ on the rotated model with the
# importance-weighted `--mse` grid search. Measured with exactly this protocol at 7e2add2: 74.05 (with
# 8x256 calibration: 70.45; plain GPTQ there: 263.1). The ceiling is that measurement + ~20 %; on the
# bench protocol GPTQ --rotate without --mse measured 1.6x the --mse perplexity, so losing the grid
# search fails it, as do losing the rotation or a packing error.
W3G64_CEILING = 89.0


@pytest.mark.slow
def test_smollm2_w3g64_quality_floor(smollm2, cli, tmp_path, hamlet):
    from weightsmith.assets import political_speeches

    out = tmp_path / "q"
    r = cli(
        "quant",
        smollm2,
        out,
        "--bits",
        "3",
        "--group-size",
        "64",
        "--calib",
        political_speeches(),
        "--calib-field",
        "speeches",
        "--calib-samples",
        "4",
        "--calib-length",
        "256",
        "--rotate",
        "--mse",
    )
    assert r.code == 0, r
    ppl = json.loads(cli("eval", out, "--text", hamlet, "--windows", "4", "--json").out)["perplexity"]
    assert ppl <= W3G64_CEILING, ppl


# The W2 g32 quality floor on SmolLM2, same bounded protocol, for the best stack measured at 2 bits
# (docs/quantization.md): GPTQ on the rotated model with --mse and an asymmetric grid (--no-sym; the
# symmetric 2-bit grid measured 41.8x against 4.7x in docs/quantization.md's 16x256 runs). Measured with exactly
# this protocol at 7e2add2: 215.8 (4 windows; with 8x256 calibration: 289.3); the ceiling is that + ~25 %.
W2G32_CEILING = 270.0


@pytest.mark.slow
def test_smollm2_w2g32_quality_floor(smollm2, cli, tmp_path, hamlet):
    from weightsmith.assets import political_speeches

    out = tmp_path / "q"
    calib = ["--calib", political_speeches(), "--calib-field", "speeches", "--calib-samples", "4", "--calib-length"]
    r = cli("quant", smollm2, out, "--bits", "2", "--group-size", "32", *calib, "256", "--rotate", "--mse", "--no-sym")
    assert r.code == 0, r
    ppl = json.loads(cli("eval", out, "--text", hamlet, "--windows", "4", "--json").out)["perplexity"]
    assert ppl <= W2G32_CEILING, ppl


def test_rotate_refuses_sublayer_output_norms(tiny_model, cli, tmp_path, monkeypatch):
    """A family with norms on each sublayer's output (Gemma's sandwich norms) cannot be rotated
    exactly: one-line refusal naming the norm, for `rotate` and `quant --rotate`."""
    import dataclasses

    import weightsmith.arch as arch

    src = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), src)
    t = load_file(src / "model.safetensors")
    for n in [n for n in t if n.endswith("input_layernorm.weight")]:  # the sandwich norm's tensors
        t[n.replace("input_layernorm", "post_attention_norm")] = t[n].clone()
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    llama = arch._BY_TYPE["llama"]
    norms = {**llama.layer_norms, "attn_out": "post_attention_norm"}
    monkeypatch.setitem(arch._BY_TYPE, "llama", dataclasses.replace(llama, layer_norms=norms))
    for args in (("rotate", src, tmp_path / "r"), ("quant", src, tmp_path / "q", "--method", "rtn", "--rotate")):
        r = cli(*args)
        err = r.err.replace("hashing inputs...", "").strip()
        assert r.code != 0 and "model.layers.0.post_attention_norm normalises a sublayer's output" in err, r
        assert "quantize without --rotate" in err and len(err.splitlines()) == 1, err
