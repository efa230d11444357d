"""Pruning on SmolLM2 (or --model) side by side with the anchors: ours, ShortGPT, Wanda-sp, our old slicing.

    .venv/bin/python bench/prune.py [--reductions 0.2,0.25,0.1] [--eval-windows 16] [--calib-samples 64]
                                    [--distill-tokens 8192] [--distill-at 0.25] [--minitron-at 0.2]
                                    [--model smollm2|gemma3-270m|DIR] [--methods 0,1,2,3,4] [--tag T]

One protocol for every row. Importance and repair calibration: --calib-samples x 256 tokens of
political_data.json speeches; evaluation: hamlet.txt perplexity (fp32, 512-token windows). For each
reduction in parameters (embedding and LM head included, tied once):

- ours: `prune --params F --axis mlp` (MLP neurons by Minitron activation importance, hidden size,
  heads and layers kept; down_proj repaired by least squares to its own output on the pruned inputs,
  `--refit layer`, the default);
- ShortGPT-style layer drop: `prune --params F --axis depth --refit none` (lowest Block Influence);
- Wanda-sp (reimplementation, MLP-only): `prune --params F --axis mlp --importance wanda --refit none`
  (|W|·‖X‖ summed per neuron, uniform ratio, no repair) — not the FLAP repository's code;
- our old slicing: `prune --params F --axis width --refit none` (the previous default: hidden and
  MLP scaled together, Minitron activation importance, no repair);
- our layer drop: `prune --params F --axis depth --depth-metric greedy --refit none` (the layers a
  global greedy search removes one at a time by the KL from the source on the first 8 calibration
  windows).

At --distill-at, ours is healed with `weightsmith distill` (--distill-tokens tokens of speeches,
lr 1e-4). With --minitron-at, one `minitron --params F` run (its peak RSS is one of the goals).
Every command is its own process: wall time and peak RSS are the child's. The results JSON
records the git commit and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import gemma3_270m, git_commit, print_table, save  # noqa: E402
from quant import perplexity, run_child, smollm2, ws  # noqa: E402

METHODS = {  # label -> prune arguments after --params (None: the calibration arguments)
    "ours (MLP + least-squares repair)": ["--axis", "mlp", None],
    "ShortGPT layer drop (Block Influence)": ["--axis", "depth", "--refit", "none", None],
    "Wanda-sp MLP (reimplementation)": ["--axis", "mlp", "--importance", "wanda", "--refit", "none", None],
    "old slicing (width, no repair)": ["--axis", "width", "--refit", "none", None],
    "greedy layer drop (calibration loss)": ["--axis", "depth", "--depth-metric", "greedy", "--refit", "none", None],
}


def step(cmd: list) -> dict:
    r = run_child(ws(*cmd))
    if r["rc"] != 0:
        raise SystemExit(f"failed: weightsmith {' '.join(map(str, cmd))}\n{r['output'][-3000:]}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench/prune")
    ap.add_argument("--reductions", default="0.2,0.25,0.1")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--distill-tokens", type=int, default=8192)
    ap.add_argument("--distill-at", type=float, default=0.25)
    ap.add_argument("--minitron-at", type=float, default=None)
    ap.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (default), gemma3-270m (the bench asset, `make bench-assets`) or a model directory",
    )
    ap.add_argument("--source-ppl", type=float, default=None, help="the source's perplexity (skips measuring it)")
    ap.add_argument(
        "--tag", default="", help="results go to bench/results/prune[-TAG].json (runs split over processes)"
    )
    ap.add_argument(
        "--methods", default=",".join(str(i) for i in range(len(METHODS))), help="indices into the method list"
    )
    args = ap.parse_args()

    from weightsmith.assets import hamlet, political_speeches
    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.eval.accounting import param_count

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    models = {"smollm2": lambda: smollm2(scratch), "gemma3-270m": gemma3_270m}
    src = models[args.model]() if args.model in models else Path(args.model)
    name = {"smollm2": "SmolLM2-135M", "gemma3-270m": "Gemma-3-270M"}.get(args.model, src.name)
    text = hamlet()
    calib = [
        "--calib",
        political_speeches(),
        "--calib-field",
        "speeches",
        "--calib-samples",
        args.calib_samples,
        "--calib-length",
        "256",
    ]
    commit = git_commit()
    dirty = commit.endswith("-dirty")
    commit = commit.removesuffix("-dirty")
    meta = {
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "eval_windows": args.eval_windows,
        "calib_samples": args.calib_samples,
        "model": name,
        "load_before": os.getloadavg(),
    }
    fp = args.source_ppl or perplexity(src, text, args.eval_windows)
    rows = [{"model": f"{name} (source)", "params": param_count(Checkpoint(src)), "ppl": fp, "x_source": 1.0}]
    print(rows[0], flush=True)
    labels = list(METHODS)
    chosen = [labels[int(i)] for i in args.methods.split(",")]
    for red in [float(x) for x in args.reductions.split(",")]:
        keep = f"{1 - red:.4g}"
        jobs = [
            (label, ["prune", src, None, "--params", keep, *[a for a in METHODS[label] if a is not None], *calib])
            for label in chosen
        ]
        if args.minitron_at is not None and abs(red - args.minitron_at) < 1e-9:
            jobs.append(("Minitron search + repair", ["minitron", src, None, "--params", keep, *calib]))
        for label, cmd in jobs:
            out = scratch / f"{name}-{label.split()[0]}-{red}"
            shutil.rmtree(out, ignore_errors=True)
            r = step([out if c is None else c for c in cmd])
            m = json.loads((out / "manifest.json").read_text())["metrics"]
            ppl = perplexity(out, text, args.eval_windows)
            row = {
                "model": f"-{red:.0%} {label}",
                "params": m["params_after"],
                "fraction": m["params_after"] / rows[0]["params"],
                "ppl": ppl,
                "x_source": ppl / fp,
                "seconds": r["seconds"],
                "peak_rss_mb": r["peak_rss_mb"],
                "arch": m.get("chosen") or json.dumps(m.get("targets", {}), separators=(",", ":")),
                "refit_errors": m.get("refit_errors"),
                "layers_dropped": [i for i in range(len(m["layer_scores"]["values"])) if i not in m["kept"]["layers"]]
                if m.get("layer_scores")
                else [],
                "non_embedding_fraction": m["non_embedding_params_after"] / m["non_embedding_params_before"],
                "load": os.getloadavg(),
            }
            if label.startswith("ours") and abs(red - args.distill_at) < 1e-9 and args.distill_tokens > 0:
                d = Path(str(out) + "-distilled")
                shutil.rmtree(d, ignore_errors=True)
                rd = step(
                    [
                        "distill",
                        out,
                        src,
                        d,
                        *calib[:4],
                        "--tokens",
                        args.distill_tokens,
                        "--calib-length",
                        "256",
                        "--lr",
                        "1e-4",
                    ]
                )
                row["ppl_distilled"] = perplexity(d, text, args.eval_windows)
                row["x_source_distilled"] = row["ppl_distilled"] / fp
                row["distill_tokens"] = args.distill_tokens
                row["distill_seconds"] = rd["seconds"]
                row["distill_rss_mb"] = rd["peak_rss_mb"]
                shutil.rmtree(d, ignore_errors=True)
            rows.append(row)
            print(row, flush=True)
            shutil.rmtree(out, ignore_errors=True)
            save(
                "prune" + (f"-{args.tag}" if args.tag else ""), {**meta, "rows": rows, "partial": True}
            )  # survives an interrupted run
    cols = [
        "model",
        "params",
        "fraction",
        "ppl",
        "x_source",
        "ppl_distilled",
        "x_source_distilled",
        "distill_tokens",
        "seconds",
        "peak_rss_mb",
        "arch",
    ]
    print_table(rows, cols, f"{name} pruned: hamlet perplexity over {args.eval_windows}x512 tokens")
    save("prune" + (f"-{args.tag}" if args.tag else ""), {**meta, "rows": rows})


if __name__ == "__main__":
    main()
