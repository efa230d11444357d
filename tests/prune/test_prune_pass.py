"""Structured pruning: exactness where the maths is exact, GQA consistency, every family loads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

CAL = ["--calib-samples", "4", "--calib-length", "64"]


def _logits(path, ids):
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits


IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
# The test's bounded protocol (8x256 calibration tokens, 8 hamlet windows): `prune --params 0.8 --axis mlp`
# (cross-validated repair) measured 104.79 at 4c13d17 (source 43.65 on these windows; `--refit none`:
# 127.83, so losing the repair fails); +5 % margin. The bench's protocol (bench/prune.py
# --calib-samples 32 --eval-windows 16) measured 90.2 (98.2 with the fixed-ridge repair).
PPL_CEILING_MINUS_20 = 110.0


@pytest.mark.parametrize("fam", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_no_reduction_reproduces_logits(fam, tiny_model, cli, tmp_path, hamlet):
    src = tiny_model(fam)
    r = cli(
        "prune", src, tmp_path / "o", "--ffn", "96", "--calib", hamlet, *CAL
    )  # the source's own width: no reduction
    assert r.code == 0, r
    torch.testing.assert_close(_logits(tmp_path / "o", IDS), _logits(src, IDS), rtol=0, atol=1e-5)


def test_kept_heads_and_neurons_compute_the_restricted_source(tiny_model, cli, tmp_path, hamlet):
    """Plain slicing (--refit none) equals the source with the dropped heads/neurons zeroed (exact)."""
    src = tiny_model("qwen2")  # q/k/v biases
    out = tmp_path / "o"
    assert cli("prune", src, out, "--heads", "2", "--ffn", "40", "--refit", "none", "--calib", hamlet, *CAL).code == 0
    kept = json.loads((out / "manifest.json").read_text())["metrics"]["kept"]
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hd = ref.config.hidden_size // ref.config.num_attention_heads
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            k = kept["per_layer"][str(i)]
            assert len(k["q_heads"]) == 2 and sorted({h // 2 for h in k["q_heads"]}) == [0, 1]  # one per KV group
            mask = torch.zeros(ref.config.num_attention_heads * hd)
            for h in k["q_heads"]:
                mask[h * hd : (h + 1) * hd] = 1
            layer.self_attn.o_proj.weight.mul_(mask)
            nm = torch.zeros(ref.config.intermediate_size)
            nm[k["ffn"]] = 1
            layer.mlp.down_proj.weight.mul_(nm)
        want = ref(IDS).logits
    torch.testing.assert_close(_logits(out, IDS), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "fam,args",
    [
        ("llama", ["--hidden", "48", "--ffn", "64", "--heads", "2"]),
        ("mistral", ["--params", "0.7"]),
        ("qwen2", ["--kv-heads", "1", "--heads", "1", "--importance", "wanda"]),
        ("qwen3", ["--hidden", "32", "--layers", "1", "--importance", "magnitude"]),
        ("gemma3_text", ["--heads", "2", "--ffn", "48", "--layers", "1"]),
        ("mixtral", ["--expert-ffn", "24", "--hidden", "48"]),
        ("qwen2_moe", ["--expert-ffn", "16", "--heads", "2"]),
        ("qwen3_moe", ["--expert-ffn", "16", "--ffn", "48"]),
    ],
)
def test_families_load_and_generate(fam, args, tiny_model, cli, tmp_path, hamlet):
    out = tmp_path / "o"
    r = cli("prune", tiny_model(fam), out, "--calib", hamlet, *CAL, *args)
    assert r.code == 0, r
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)
    meta = json.loads((out / "manifest.json").read_text())["metrics"]
    assert meta["params_after"] < meta["params_before"] and meta["params_after"] == sum(
        p.numel() for p in m.parameters()
    )
    emb = m.get_input_embeddings().weight.numel() + (
        0 if m.config.tie_word_embeddings else m.get_output_embeddings().weight.numel()
    )
    assert meta["non_embedding_params_after"] == meta["params_after"] - emb
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == 16 or fam == "qwen2"


def test_depth_pruning_drops_the_least_influential_layer(tiny_model, cli, tmp_path, hamlet):
    src = tiny_model("llama", layers=4)
    out = tmp_path / "o"
    assert cli("prune", src, out, "--layers", "3", "--calib", hamlet, *CAL).code == 0
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    bi = m["layer_scores"]["values"]
    dropped = sorted(set(range(4)) - set(m["kept"]["layers"]))
    assert dropped == [min(range(4), key=lambda i: bi[i])]
    src_ck = AutoModelForCausalLM.from_pretrained(src)
    out_m = AutoModelForCausalLM.from_pretrained(out)
    new = m["kept"]["layers"].index(3) if 3 in m["kept"]["layers"] else None
    if new is not None:
        torch.testing.assert_close(
            out_m.model.layers[new].mlp.up_proj.weight, src_ck.model.layers[3].mlp.up_proj.weight
        )


def test_tied_embeddings_are_sliced_once_and_stay_tied(tiny_model, cli, tmp_path, hamlet):
    src = tiny_model("llama", tie_word_embeddings=True)
    r = cli("prune", src, tmp_path / "n", "--ffn", "96", "--calib", hamlet, *CAL)  # no reduction
    assert r.code == 0, r
    torch.testing.assert_close(_logits(tmp_path / "n", IDS), _logits(src, IDS), rtol=0, atol=1e-5)
    out = tmp_path / "o"
    assert cli("prune", src, out, "--hidden", "48", "--calib", hamlet, *CAL).code == 0
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.tie_word_embeddings and m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    assert m.model.embed_tokens.weight.shape == (256, 48)
    kept = json.loads((out / "manifest.json").read_text())["metrics"]["kept"]["hidden"]
    ref = AutoModelForCausalLM.from_pretrained(src)
    torch.testing.assert_close(m.model.embed_tokens.weight, ref.model.embed_tokens.weight[:, kept])


def test_depth_by_measured_loss_drops_one_contiguous_block(tiny_model, cli, tmp_path, hamlet):
    src = tiny_model("llama", layers=6)
    out = tmp_path / "o"
    r = cli("prune", src, out, "--layers", "4", "--depth-metric", "loss", "--contiguous", "--calib", hamlet, *CAL)
    assert r.code == 0, r
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    loss = m["layer_scores"]["values"]
    dropped = sorted(set(range(6)) - set(m["kept"]["layers"]))
    assert len(dropped) == 2 and dropped[1] == dropped[0] + 1 and 0 not in dropped and 5 not in dropped
    assert dropped[0] == min(range(1, 4), key=lambda s: (loss[s] + loss[s + 1], s))
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4


def test_impossible_targets_name_the_valid_values(tiny_model, cli, tmp_path, hamlet):
    src = tiny_model("llama")
    cases = [
        (["--heads", "3"], "nearest valid: 2 or 4"),
        (["--hidden", "50"], "multiple of the 4 query heads"),
        (["--ffn", "500"], "must be in 1..96"),
        (["--layers", "0"], "must be in 1..2"),
        (["--params", "2B"], "must be between 0 and"),
        (["--params", "0.5", "--hidden", "32"], "--params chooses the sizes itself"),
    ]
    for args, msg in cases:
        r = cli("prune", src, tmp_path / "x", *args)
        assert r.code == 2 and msg in r.err, (args, r)
        assert not (tmp_path / "x").exists()
    r = cli("prune", tiny_model("qwen2_moe"), tmp_path / "x", "--drop-layers", "0", "--calib", hamlet, *CAL)
    assert r.code == 2 and "changes which layers are MoE" in r.err


@pytest.mark.slow
def test_smollm2_activation_beats_magnitude(smollm2, cli, tmp_path, hamlet):
    from weightsmith.assets import political_speeches

    calib = [
        "--calib",
        political_speeches(),
        "--calib-field",
        "speeches",
        "--calib-samples",
        "32",
        "--calib-length",
        "256",
    ]
    ppl = {}
    for imp in ("activation", "magnitude"):
        out = tmp_path / imp
        # the importance ranking alone (the repair, tested on its own below, would double the cost)
        assert cli("prune", smollm2, out, "--ffn", "1024", "--importance", imp, "--refit", "none", *calib).code == 0
        ppl[imp] = json.loads(cli("eval", out, "--text", hamlet, "--windows", "4", "--json").out)["perplexity"]
    assert ppl["activation"] < ppl["magnitude"], ppl
    # the pruned SmolLM2 (tied embeddings, 9 heads / 3 KV) loads in stock transformers and generates
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "activation")
    tok = AutoTokenizer.from_pretrained(tmp_path / "activation")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert (
        gen.shape == (1, ids.shape[1] + 4)
        and model.config.intermediate_size == 1024
        and model.config.tie_word_embeddings
    )


def test_gemma3_keeps_its_hidden_size(tiny_model, cli, tmp_path, hamlet):
    """Gemma scales embeddings by sqrt(hidden_size) from the config: --hidden refuses, --params prunes the rest."""
    src = tiny_model("gemma3_text")
    r = cli("prune", src, tmp_path / "x", "--hidden", "48", "--calib", hamlet, *CAL)
    assert r.code != 0 and "sqrt(hidden_size)" in r.err and len([x for x in r.err.splitlines() if "Error" in x]) == 1, r
    assert not (tmp_path / "x").exists()
    r = cli("prune", src, tmp_path / "o", "--params", "0.8", "--calib", hamlet, *CAL)
    assert r.code == 0, r
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["intermediate_size"] < 96


@pytest.mark.parametrize(
    "fam,args", [("llama", ["--ffn", "40", "--heads", "2"]), ("qwen3_moe", ["--expert-ffn", "12", "--ffn", "40"])]
)
@pytest.mark.parametrize("target", ["layer", "block", "source"])
def test_refit_brings_the_pruned_model_closer_on_calibration(fam, args, target, tiny_model, cli, tmp_path, hamlet):
    """Least-squares repair: every repaired projection's output error drops, and the whole model's
    divergence from the source on the calibration text is below plain slicing's."""
    from transformers import AutoTokenizer

    from weightsmith.eval.perplexity import divergence

    src = tiny_model(fam)
    cal = ["--calib", hamlet, "--calib-samples", "16", "--calib-length", "64"]
    assert cli("prune", src, tmp_path / "none", *args, "--refit", "none", *cal).code == 0
    assert cli("prune", src, tmp_path / "fit", *args, "--refit", target, *cal).code == 0
    m = json.loads((tmp_path / "fit" / "manifest.json").read_text())["metrics"]
    assert m["refit"] == target and m["refit_errors"]["refit"] < m["refit_errors"]["sliced"]
    tok = AutoTokenizer.from_pretrained(src)
    ids = torch.tensor(tok(hamlet.read_text()[:20000])["input_ids"][: 8 * 64]).view(8, 64)
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    kl = {
        k: divergence(ref, AutoModelForCausalLM.from_pretrained(tmp_path / k, dtype=torch.float32), ids)["mean_kl"]
        for k in ("none", "fit")
    }
    assert kl["fit"] < kl["none"], kl


@pytest.mark.slow
@pytest.mark.threads(2)  # 8x256 calibration, 8 windows (32x256 and 16 windows took ~170 s on one thread)
def test_smollm2_quality_floor_at_minus_20_percent(smollm2, cli, tmp_path, hamlet):
    """-20 % parameters (MLP neurons, least-squares repair), no training: a perplexity ceiling from
    a measurement of this exact protocol (PPL_CEILING_MINUS_20), and the repair lowers every layer's
    output error."""
    from weightsmith.assets import political_speeches

    calib = [
        "--calib",
        political_speeches(),
        "--calib-field",
        "speeches",
        "--calib-samples",
        "8",
        "--calib-length",
        "256",
    ]
    out = tmp_path / "p80"
    assert cli("prune", smollm2, out, "--params", "0.8", "--axis", "mlp", *calib).code == 0
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["params_after"] <= 0.8 * m["params_before"] and m["refit"] == "layer"
    assert m["refit_errors"]["projections"] == 30 and m["refit_errors"]["refit"] < 0.6 * m["refit_errors"]["sliced"]
    ppl = json.loads(cli("eval", out, "--text", hamlet, "--windows", "8", "--json").out)["perplexity"]
    assert ppl < PPL_CEILING_MINUS_20, ppl
