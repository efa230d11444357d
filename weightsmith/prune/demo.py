"""Demo step: the demo model pruned to 75 % of its parameters along width with Minitron
activation importance (hidden channels and MLP neurons, all heads and layers kept)."""

from __future__ import annotations

from pathlib import Path


def demo_step(base: Path, out: Path, say, run) -> dict:
    from weightsmith.assets import political_speeches

    dst = out / "smollm2-pruned-w75"
    name, cfg = (
        "prune",
        {
            "params": "0.75",
            "axis": "width",
            "importance": "activation",
            "calib": str(political_speeches()),
            "calib_field": "speeches",
            "calib_samples": 16,
            "calib_length": 256,
        },
    )
    say(f"prune (75 % of the parameters, width, Minitron activation importance on 16x256 speech tokens) -> {dst}")
    res = run(name, cfg, [str(base)], dst)
    m = res.manifest["metrics"]
    t = m["targets"]
    say(
        f"      {m['params_before']:,} -> {m['params_after']:,} parameters (hidden {t['hidden']}, MLP {t['ffn']}); "
        f"recover with: weightsmith distill {dst} {base} DST --calib ... --tokens N"
    )
    means = (
        f"hidden and MLP widths cut (Minitron activation importance, no distillation): {m['params_after']:,} of "
        f"{m['params_before']:,} parameters, every layer and head kept"
    )
    return {
        "label": f"pruned to {m['fraction']:.0%} params (width)",
        "means": means,
        "path": str(dst),
        "params": m["params_after"],
        "status": res.status,
    }
