"""Demo step: GPTQ W4 g128 of the demo model, calibrated on political speeches."""

from __future__ import annotations

from pathlib import Path


def demo_step(base: Path, out: Path, say, run) -> dict:
    from weightsmith.assets import political_speeches

    dst = out / "smollm2-gptq-w4g128"
    name, cfg = (
        "quant",
        {
            "method": "gptq",
            "bits": 4,
            "group_size": 128,
            "calib": str(political_speeches()),
            "calib_field": "speeches",
            "calib_samples": 32,
            "calib_length": 512,
        },
    )
    say(f"quant (GPTQ, 4-bit, group 128, 32x512 calibration tokens from speeches) -> {dst}")
    res = run(name, cfg, [str(base)], dst)
    m = res.manifest["metrics"]
    n, adj = m["quantized_modules"], m["group_adjustments"]
    label = "GPTQ W4 g128" + (f" (g64 in {len(adj)}/{n})" if adj else "")
    means = (
        f"4-bit GPTQ weights in compressed-tensors format (loads with transformers + compressed-tensors), "
        f"{m['bits_per_quantized_weight']:.2f} bits per quantized weight with scales"
    )
    if adj:
        reason = sorted({v.split(": ", 1)[-1] for v in adj.values()})
        means += f"; group 128 in {n - len(adj)} modules, smaller groups in {len(adj)} where {', '.join(reason)}"
    return {
        "label": label,
        "means": means,
        "path": str(dst),
        "bits_per_weight": m["bits_per_quantized_weight"],
        "status": res.status,
    }
