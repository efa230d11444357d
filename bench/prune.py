"""Pruning accuracy, time and memory on SmolLM2: width, depth and Minitron-searched, then distilled.

    .venv/bin/python bench/prune.py [--reductions 0.1,0.25,0.5] [--eval-windows 16]
                                    [--distill-tokens 32768] [--distill-at 0.25 | --distill-all]

Importance calibration: 64 x 256 tokens of political_data.json speeches; evaluation: hamlet.txt
perplexity (fp32, 512-token windows). For each reduction in parameters: width-only
(`prune --params F --axis width`, hidden and MLP scaled together, Minitron activation
importance), the same with magnitude importance, depth-only (`--axis depth`, Block Influence) and
`minitron --params F` (8 candidates ranked by KL). The models at --distill-at are then distilled
from the source with `weightsmith distill` on speeches (token count in the table). Every command
is its own process: wall time and peak RSS are the child's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, save  # noqa: E402
from quant import perplexity, run_child, smollm2, ws  # noqa: E402


def step(cmd: list[str]) -> dict:
    r = run_child(ws(*cmd))
    if r["rc"] != 0:
        raise SystemExit(f"failed: weightsmith {' '.join(map(str, cmd))}\n{r['output'][-3000:]}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench/prune")
    ap.add_argument("--reductions", default="0.1,0.25,0.5")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--distill-tokens", type=int, default=32768)
    ap.add_argument("--distill-at", type=float, default=0.25)
    ap.add_argument("--distill-all", action="store_true")
    args = ap.parse_args()

    from weightsmith.assets import hamlet, political_speeches

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    src = smollm2(scratch)
    text = hamlet()
    calib = ["--calib", political_speeches(), "--calib-field", "speeches"]
    fp = perplexity(src, text, args.eval_windows)
    src_params = json.loads((src / "manifest.json").read_text())
    rows = [{"model": "SmolLM2-135M (source)", "params": None, "ppl": fp}]
    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.eval.accounting import param_count

    rows[0]["params"] = param_count(Checkpoint(src))
    print(rows[0], flush=True)
    for red in [float(x) for x in args.reductions.split(",")]:
        keep = f"{1 - red:.4g}"
        jobs = [
            ("width (activation)", ["prune", src, None, "--params", keep, "--axis", "width", *calib]),
            (
                "width (magnitude)",
                ["prune", src, None, "--params", keep, "--axis", "width", "--importance", "magnitude"],
            ),
            ("depth (Block Influence)", ["prune", src, None, "--params", keep, "--axis", "depth", *calib]),
            ("minitron search", ["minitron", src, None, "--params", keep, *calib]),
        ]
        for label, cmd in jobs:
            out = scratch / f"{label.split()[0]}-{label.split('(')[-1].rstrip(')').replace(' ', '')}-{red}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [out if c is None else c for c in cmd]
            r = step(cmd)
            m = json.loads((out / "manifest.json").read_text())["metrics"]
            row = {
                "model": f"-{red:.0%} {label}",
                "params": m["params_after"],
                "ppl": perplexity(out, text, args.eval_windows),
                "seconds": r["seconds"],
                "peak_rss_mb": r["peak_rss_mb"],
                "arch": m.get("chosen") or json.dumps(m.get("targets", {}), separators=(",", ":")),
            }
            if args.distill_all or abs(red - args.distill_at) < 1e-9:
                d = Path(str(out) + "-distilled")
                shutil.rmtree(d, ignore_errors=True)
                rd = step(
                    [
                        "distill",
                        out,
                        src,
                        d,
                        *calib,
                        "--tokens",
                        args.distill_tokens,
                        "--calib-length",
                        "256",
                        "--lr",
                        "1e-4",
                    ]
                )
                row["ppl_distilled"] = perplexity(d, text, args.eval_windows)
                row["distill_tokens"] = args.distill_tokens
                row["distill_seconds"] = rd["seconds"]
                shutil.rmtree(d, ignore_errors=True)
            rows.append(row)
            print(row, flush=True)
            shutil.rmtree(out, ignore_errors=True)
            save(
                "prune", {"rows": rows, "eval_windows": args.eval_windows, "partial": True}
            )  # survives an interrupted run
    cols = ["model", "params", "ppl", "ppl_distilled", "distill_tokens", "seconds", "peak_rss_mb", "arch"]
    print_table(rows, cols, f"SmolLM2-135M pruned: hamlet perplexity over {args.eval_windows}x512 tokens")
    save(
        "prune",
        {
            "rows": rows,
            "eval_windows": args.eval_windows,
            "source_manifest_pass": src_params.get("pass", {}).get("name"),
        },
    )


if __name__ == "__main__":
    main()
