"""Demo step: GQA→MLA (TransMLA) of the demo model at half its KV cache, as a stock DeepseekV3 model."""

from __future__ import annotations

from pathlib import Path


def demo_step(base: Path, out: Path, say, run) -> dict:
    from weightsmith.assets import political_speeches

    dst = out / "smollm2-mla-kv50"
    name, cfg = (
        "mla",
        {
            "method": "transmla",
            "target": "exact",
            "kv_ratio": 0.5,
            "calib": str(political_speeches()),
            "calib_field": "speeches",
            "calib_samples": 16,
            "calib_length": 256,
        },
    )
    say(f"mla (TransMLA, 50% of the KV cache, DeepseekV3 layout, 16x256 calibration tokens from speeches) -> {dst}")
    res = run(name, cfg, [str(base)], dst)
    m = res.manifest["metrics"]
    means = (
        "GQA attention rewritten as Multi-head Latent Attention (TransMLA, no training): a stock "
        "DeepseekV3ForCausalLM "
        f"caching {m['kv_cache_ratio']:.0%} of the source's KV values per token"
    )
    return {
        "label": "MLA TransMLA KV 50%",
        "means": means,
        "path": str(dst),
        "kv_cache_ratio": m["kv_cache_ratio"],
        "qk_rope_head_dim": m["qk_rope_head_dim"],
        "status": res.status,
    }
