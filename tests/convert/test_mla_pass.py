"""`weightsmith mla` end to end on tiny random models and on SmolLM2: stock loading, exactness,
the engine layout, accounting, errors, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

CAL = ("--calib-samples", "4", "--calib-length", "64", "--loss-windows", "2")


def _run(cli, src, dst, hamlet, *args):
    return cli("mla", str(src), str(dst), "--calib", str(hamlet), *CAL, *args)


def _logits(path, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return type(m).__name__, m(ids).logits, m


def _tiny(tiny_model, family):
    # sharper attention than the default init (std 0.02 makes attention nearly uniform)
    return tiny_model(family, initializer_range=0.25)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_exact_target_reproduces_the_source_at_full_cache(family, tiny_model, tmp_path, cli, hamlet):
    src = _tiny(tiny_model, family)
    r = _run(cli, src, tmp_path / "mla", hamlet)
    assert r.code == 0, r
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    _, ref, _ = _logits(src, ids)
    name, got, model = _logits(tmp_path / "mla", ids)
    assert name == "DeepseekV3ForCausalLM"
    assert ref.abs().max() > 1.0  # the check is not trivially met by flat logits
    assert (got - ref).abs().max() <= 1e-3
    out = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)
    cfg = json.loads((tmp_path / "mla" / "config.json").read_text())
    assert (
        cfg["model_type"] == "deepseek_v3"
        and "auto_map" not in cfg
        and cfg["first_k_dense_replace"] == cfg["num_hidden_layers"]
    )
    assert (cfg["q_lora_rank"] is not None) == (family == "qwen2")  # q_lora only to carry Qwen2's query bias
    m = json.loads((tmp_path / "mla" / "manifest.json").read_text())["metrics"]
    before, after = m["kv_cache_before"]["values_per_token"], m["kv_cache_after"]["values_per_token"]
    assert after == before + cfg["num_hidden_layers"]  # + the constant latent channel, reported
    assert m["mean_attention_output_error"] < 1e-9 and len(m["layers"]) == cfg["num_hidden_layers"]


def test_reduced_cache_both_methods_load_generate_and_degrade_gracefully(tiny_model, tmp_path, cli, hamlet):
    src = _tiny(tiny_model, "llama")
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    _, ref, _ = _logits(src, ids)
    errs = {}
    for method in ("transmla", "mha2mla"):
        for ratio in ("0.5", "0.25"):
            dst = tmp_path / f"{method}-{ratio}"
            r = _run(cli, src, dst, hamlet, "--method", method, "--kv-ratio", ratio)
            assert r.code == 0, r
            _, got, model = _logits(dst, ids)
            assert torch.isfinite(got).all()
            errs[(method, ratio)] = float((got.softmax(-1) - ref.softmax(-1)).abs().sum(-1).mean())
            m = json.loads((dst / "manifest.json").read_text())["metrics"]
            src_vals = m["kv_cache_before"]["values_per_token"]
            layers = len(m["layers"])
            assert (
                m["kv_cache_after"]["values_per_token"] == round(float(ratio) * src_vals) + layers
            )  # budget + constant channel
            model.generate(ids[:1, :8], max_new_tokens=3, do_sample=False)
    print(errs)
    # random tiny models compress badly (no structure to find): quality thresholds live in the SmolLM2
    # test and bench; here, the calibrated method must not lose to the weight-only one at half cache
    assert errs[("transmla", "0.5")] <= errs[("mha2mla", "0.5")] * 1.1


def test_engine_target_matches_the_deepseek_layout_vllm_expects(tiny_model, tmp_path, cli, hamlet):
    src = _tiny(tiny_model, "llama")
    dst = tmp_path / "engine"
    r = _run(cli, src, dst, hamlet, "--target", "engine")
    assert r.code == 0, r
    cfg = json.loads((dst / "config.json").read_text())
    assert (
        cfg["architectures"] == ["DeepseekV3ForCausalLM"]
        and cfg["attention_bias"] is False
        and cfg["q_lora_rank"] is None
    )
    assert cfg["rope_interleave"] is True and cfg["rope_parameters"]["rope_type"] == "default"
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"]
    n_h, hid = cfg["num_attention_heads"], cfg["hidden_size"]
    r_, d_r, d_n, d_v = cfg["kv_lora_rank"], cfg["qk_rope_head_dim"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    assert r_ + d_r == 2 * 2 * 16  # tiny llama: full cache (2 KV heads × 16) by default
    with safe_open(dst / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert not [n for n in names if n.endswith(".bias")]
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}.self_attn."
            want = {
                "q_proj.weight": (n_h * (d_n + d_r), hid),
                "kv_a_proj_with_mqa.weight": (r_ + d_r, hid),
                "kv_a_layernorm.weight": (r_,),
                "kv_b_proj.weight": (n_h * (d_n + d_v), r_),
                "o_proj.weight": (hid, n_h * d_v),
            }
            for k, shape in want.items():
                assert tuple(f.get_slice(p + k).get_shape()) == shape, k
            assert {n for n in names if n.startswith(p)} == {p + k for k in want}
    name, got, model = _logits(dst, torch.randint(0, 256, (1, 32)))
    assert name == "DeepseekV3ForCausalLM" and torch.isfinite(got).all()
    model.generate(torch.randint(0, 256, (1, 8)), max_new_tokens=3, do_sample=False)
    m = json.loads((dst / "manifest.json").read_text())["metrics"]
    assert m["kv_cache_after"]["values_per_token"] == m["kv_cache_before"]["values_per_token"]  # no constant channel
    assert "freqfold_search" in m or "rope_dim_search" in m


@pytest.mark.parametrize(
    "family,args,match",
    [
        ("qwen3", (), "q_norm/k_norm"),
        ("gemma3_text", (), "q_norm/k_norm"),
        ("mixtral", (), "routing"),
        ("qwen2", ("--target", "engine"), "bias"),
        ("llama", ("--kv-lora-rank", "100"), "valid range 1.."),
        ("llama", ("--rope-dim", "40"), "nearest valid"),
        ("llama", ("--rope-dim", "32", "--target", "engine"), "nearest valid: 8, 16"),
        ("llama", ("--kv-ratio", "1.5"), "outside"),
        ("llama", ("--method", "mha2mla", "--target", "engine", "--partial-rope", "high"), "--partial-rope 2norm"),
        ("llama", ("--kv-ratio", "0.01"), "ratio ≥"),
    ],
)
def test_impossible_requests_fail_with_a_clear_error_and_no_output(
    family, args, match, tiny_model, tmp_path, cli, hamlet
):
    r = _run(cli, tiny_model(family), tmp_path / "out", hamlet, *args)
    assert r.code != 0 and match in r.err, r
    assert not (tmp_path / "out").exists()


def test_an_unsupported_family_is_refused_before_its_inputs_are_hashed(tiny_model, tmp_path, cli, hamlet, monkeypatch):
    import weightsmith.app.runner as runner

    def hashed(*a, **k):
        raise AssertionError("inputs hashed before the family check")

    monkeypatch.setattr(runner, "input_record", hashed)
    r = _run(cli, tiny_model("gemma3_text"), tmp_path / "out", hamlet)
    assert r.code != 0 and "q_norm/k_norm" in r.err and "hashed" not in r.err, r
    assert not (tmp_path / "out").exists()


def test_conversion_is_deterministic(tiny_model, tmp_path, cli, hamlet):
    src = _tiny(tiny_model, "qwen2")
    outs = []
    for k in range(2):
        r = _run(cli, src, tmp_path / f"o{k}", hamlet, "--kv-ratio", "0.5", "--pca-metric", "auto")
        assert r.code == 0, r
        outs.append((tmp_path / f"o{k}" / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_smollm2_exact_full_cache(smollm2, tmp_path, cli):
    from weightsmith.assets import political_speeches

    dst = tmp_path / "mla"
    r = cli(
        "mla",
        str(smollm2),
        str(dst),
        "--calib",
        str(political_speeches()),
        "--calib-field",
        "speeches",
        "--calib-samples",
        "4",
        "--calib-length",
        "128",
        "--rope-dim",
        "192",
    )
    assert r.code == 0, r
    from transformers import AutoTokenizer

    from weightsmith.assets import hamlet

    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok(Path(hamlet()).read_text()[:4000], return_tensors="pt").input_ids[:, :384]
    _, ref, _ = _logits(smollm2, ids)
    name, got, _ = _logits(dst, ids)
    assert name == "DeepseekV3ForCausalLM"
    assert (got - ref).abs().max() <= 1e-3


def test_budget_resolution_and_engine_default_is_flashmla_shape():
    from transformers import LlamaConfig

    from weightsmith.arch import arch_for
    from weightsmith.convert.mla.mla_pass import MlaConfig, resolve_budget
    from weightsmith.errors import UsageError

    big = arch_for(
        LlamaConfig(
            hidden_size=4096,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_hidden_layers=2,
            vocab_size=10,
            intermediate_size=64,
        )
    )
    b = resolve_budget(MlaConfig(target="engine"), big)
    assert (b.rank, b.rope_candidates) == (512, [64])  # what FlashMLA / vLLM's MLA kernels want
    smol = arch_for(
        LlamaConfig(
            hidden_size=576,
            num_attention_heads=9,
            num_key_value_heads=3,
            num_hidden_layers=2,
            vocab_size=10,
            intermediate_size=64,
        )
    )
    b = resolve_budget(MlaConfig(kv_ratio=0.5), smol)
    assert b.total == 192 and b.source == 384 and max(b.rope_candidates) < 192
    b = resolve_budget(MlaConfig(target="engine"), smol)  # too small for 512+64: full cache, width searched
    assert b.total == 384 and b.rope_candidates == [64, 32, 16]
    with pytest.raises(UsageError, match="valid range 1..382"):
        resolve_budget(MlaConfig(kv_lora_rank=400, rope_dim=2), smol)
    with pytest.raises(UsageError, match="at most n_kv·head_dim = 192"):
        resolve_budget(MlaConfig(rope_dim=256), smol)
    with pytest.raises(UsageError, match="head_dim 64"):
        resolve_budget(MlaConfig(rope_dim=96, target="engine"), smol)


def test_exact_target_carries_llama3_rope_scaling(tmp_path, cli, hamlet):
    from tiny import build_tiny

    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    src = build_tiny(
        "llama", tmp_path / "src", initializer_range=0.25, rope_parameters=rope, max_position_embeddings=256
    )
    r = _run(cli, src, tmp_path / "mla", hamlet)
    assert r.code == 0, r
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(2))
    _, ref, _ = _logits(src, ids)
    _, got, _ = _logits(tmp_path / "mla", ids)
    assert json.loads((tmp_path / "mla" / "config.json").read_text())["rope_parameters"]["rope_type"] == "longrope"
    assert (got - ref).abs().max() <= 1e-3


def test_engine_target_serves_both_methods_at_reduced_cache(tiny_model, tmp_path, cli, hamlet):
    from weightsmith.convert.mla import components as comp

    score = torch.tensor([[5.0, 1, 9, 1, 1, 1, 0, 2], [1.0, 7, 1, 1, 3, 1, 4, 1]])  # [n_kv=2, d/2=8]
    blocks = comp.engine_head_selection_blocks(2, 16, 8, score, torch.arange(8, dtype=torch.float64))
    kept = [(b.slots[0], float(b.freqs[0])) for b in blocks if b.keep]
    assert kept == [
        ((0, 0), 0.0),
        ((0, 2), 2.0),
        ((1, 4), 4.0),
        ((1, 6), 6.0),
    ]  # every collapse-th frequency, its best head

    src = _tiny(tiny_model, "llama")
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(2))
    for method in ("transmla", "mha2mla"):
        dst = tmp_path / method
        r = _run(cli, src, dst, hamlet, "--target", "engine", "--method", method, "--kv-ratio", "0.5")
        assert r.code == 0, r
        cfg = json.loads((dst / "config.json").read_text())
        assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 32 and cfg["rope_parameters"]["rope_type"] == "default"
        name, got, model = _logits(dst, ids)
        assert name == "DeepseekV3ForCausalLM" and torch.isfinite(got).all()
        model.generate(ids[:, :8], max_new_tokens=3, do_sample=False)


# Ceiling for the 50 % quality floor, both targets: the goal (≤ 1.9× at 50 %), below its
# regression bar (2.2×, what TransMLA's own code was quoted at). This test's protocol (4 × 256
# calibration, 4 hamlet windows) measured 1.534 (exact, ppl 58.87 vs 38.39) and 1.720 (engine,
# 66.01) at commit 28202fa (with 8 × 256 calibration: 1.540 / 1.556); bench/mla.py's 32 × 512
# protocol gave 1.40× / 1.42×.
HALF_CACHE_CEILING = 1.9


@pytest.mark.slow
@pytest.mark.parametrize("target", ["exact", "engine"])
def test_smollm2_half_cache_quality_floor(smollm2, tmp_path, cli, target):
    """50 % of the KV cache (RoPE 64 + latent 128 per layer), training-free, on the exact target and
    on the engine target vLLM/SGLang serve: the converted model's perplexity on held-out prose stays
    within HALF_CACHE_CEILING × the source's (the issue's goal; TransMLA's own code measured 1.90× on
    bench/mla.py's 32 × 512 protocol)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.assets import hamlet, political_speeches
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows

    dst = tmp_path / "mla"
    r = cli(
        "mla",
        str(smollm2),
        str(dst),
        "--target",
        target,
        "--kv-ratio",
        "0.5",
        "--calib",
        str(political_speeches()),
        "--calib-field",
        "speeches",
        "--calib-samples",
        "4",
        "--calib-length",
        "256",
        "--rope-dim",
        "64",
    )
    assert r.code == 0, r
    m = json.loads((dst / "manifest.json").read_text())["metrics"]
    extra = 30 if target == "exact" else 0  # the exact target's constant channel, one per layer
    assert m["kv_cache_after"]["values_per_token"] <= 0.5 * m["kv_cache_before"]["values_per_token"] + extra
    wins = token_windows(AutoTokenizer.from_pretrained(smollm2), read_text(hamlet()), 512, 4, source="hamlet.txt")
    p0 = perplexity(AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32), wins)["perplexity"]
    p = perplexity(AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32), wins)["perplexity"]
    print(f"50 % cache, {target} target: ppl {p:.3f} vs source {p0:.3f}: ratio {p / p0:.4f}")
    assert p / p0 <= HALF_CACHE_CEILING, (p, p0)
