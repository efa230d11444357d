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
    return {
        "label": "GPTQ W4 g128",
        "path": str(dst),
        "bits_per_weight": m["bits_per_quantized_weight"],
        "status": res.status,
    }
