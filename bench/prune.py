"""Structured pruning on SmolLM2: width vs depth vs Minitron search, activation vs magnitude
importance, before and after a short distillation.

    .venv/bin/python bench/prune.py [--reductions 10,25,50] [--methods width,width-magnitude,depth,minitron]
                                    [--minitron-at 25] [--calib-samples 16] [--calib-length 256]
                                    [--eval-windows 8] [--distill-at 25] [--distill-tokens 4096]
                                    [--distill-lr 5e-4] [--candidates 4] [--score-windows 2]

The defaults are sized for a 2-core CPU shared with other jobs (distillation ran at ~13 tokens/s
there); on a quiet or larger machine raise --calib-samples, --eval-windows and --distill-tokens.

SmolLM2-135M-Instruct (imported from its GGUF wheel). Calibration and distillation text:
political_data.json speeches; evaluation: perplexity on hamlet.txt (fp32, non-overlapping
512-token windows, the same windows for every row). Budgets are fractions of ALL parameters,
the tied 49152 x hidden embedding included (it is ~21 % of SmolLM2); the "non-emb" column gives
the rest. Every prune / search / distillation runs as its own `weightsmith` process; its wall
time and peak RSS are the child's (os.wait4).

Methods: width = `prune --params F --axis width` (hidden and MLP scaled together, all heads kept,
Minitron activation importance); width-magnitude = the same sizes with weight-magnitude
importance; depth = `prune --params F --axis depth` (layers with the lowest Block Influence
dropped); minitron = `minitron --params F` (candidate architectures ranked by KL to the source).
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

METHODS = {  # label: (command, extra options)
    "width": ("prune", ["--axis", "width", "--importance", "activation"]),
    "width-magnitude": ("prune", ["--axis", "width", "--importance", "magnitude"]),
    "depth": ("prune", ["--axis", "depth"]),
    "minitron": ("minitron", []),
}


def arch(path: Path) -> str:
    c = json.loads((path / "config.json").read_text())
    return f"{c['hidden_size']}/{c['num_attention_heads']}h/{c['intermediate_size']}/{c['num_hidden_layers']}L"


def non_embedding(path: Path, params: int) -> int:
    c = json.loads((path / "config.json").read_text())
    emb = c["vocab_size"] * c["hidden_size"] * (1 if c.get("tie_word_embeddings") else 2)
    return params - emb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench/prune-bench")
    ap.add_argument("--reductions", default="10,25,50", help="percent fewer parameters (comma-separated)")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated: " + ", ".join(METHODS))
    ap.add_argument("--minitron-at", default="25", help="reductions at which the minitron search runs (it prunes and scores every candidate)")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-length", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8, help="hamlet windows of 512 tokens (the whole text is 103)")
    ap.add_argument("--distill-at", default="25", help="reductions whose models are distilled (comma-separated; '' for none)")
    ap.add_argument("--distill-methods", default="width,depth,minitron")
    ap.add_argument("--distill-tokens", type=int, default=4096)
    ap.add_argument("--distill-lr", type=float, default=5e-4)
    ap.add_argument("--candidates", type=int, default=4, help="minitron candidates")
    ap.add_argument("--score-windows", type=int, default=2, help="minitron held-out windows")
    ap.add_argument("--keep", action="store_true", help="keep the pruned checkpoints in --scratch")
    args = ap.parse_args()

    from weightsmith.demo import hamlet, political_speeches

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    src = smollm2(scratch)
    text = hamlet()
    calib = ["--calib", str(political_speeches()), "--calib-field", "speeches", "--calib-samples", str(args.calib_samples),
             "--calib-length", str(args.calib_length)]
    from transformers import AutoConfig

    from weightsmith.prune.prune_pass import count_params

    n_src = count_params(AutoConfig.from_pretrained(src))
    base_ppl = perplexity(src, text, args.eval_windows)
    rows = [{"reduction": "0 %", "method": "source", "arch": arch(src), "params": n_src, "non-emb": non_embedding(src, n_src), "ppl": base_ppl}]
    print(f"source perplexity {base_ppl:.3f} ({args.eval_windows} x 512 hamlet tokens)", flush=True)
    distill_at = {int(x) for x in args.distill_at.split(",") if x}
    distill_methods = set(args.distill_methods.split(","))
    for red in (int(x) for x in args.reductions.split(",")):
        frac = f"{1 - red / 100:.2f}"
        for method in args.methods.split(","):
            if method == "minitron" and str(red) not in args.minitron_at.split(","):
                continue
            cmd, extra = METHODS[method]
            out = scratch / f"{method}-{red}"
            shutil.rmtree(out, ignore_errors=True)
            opts = [cmd, src, out, "--params", frac, *extra, *calib]
            if method == "minitron":
                opts += ["--candidates", args.candidates, "--score-windows", args.score_windows]
            r = run_child(ws(*opts))
            if r["rc"] != 0:
                raise SystemExit(f"weightsmith {' '.join(map(str, opts))} failed:\n{r['output'][-3000:]}")
            m = json.loads((out / "manifest.json").read_text())["metrics"]
            row = {"reduction": f"{red} %", "method": method, "arch": arch(out), "params": m["params_after"],
                   "non-emb": non_embedding(out, m["params_after"]), "fraction": m["params_after"] / m["params_before"],
                   "ppl": perplexity(out, text, args.eval_windows), "seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"]}
            if method == "minitron":
                row["candidates"] = m["candidates"]
            if red in distill_at and method in distill_methods:
                dst = scratch / f"{method}-{red}-distilled"
                shutil.rmtree(dst, ignore_errors=True)
                dopts = ["distill", out, src, dst, "--calib", str(political_speeches()), "--calib-field", "speeches",
                         "--tokens", args.distill_tokens, "--lr", args.distill_lr, "--save-every", 0]
                d = run_child(ws(*dopts))
                if d["rc"] != 0:
                    raise SystemExit(f"weightsmith {' '.join(map(str, dopts))} failed:\n{d['output'][-3000:]}")
                dm = json.loads((dst / "manifest.json").read_text())["metrics"]
                row.update({"ppl distilled": perplexity(dst, text, args.eval_windows), "distill tokens": dm["tokens"],
                            "distill s": d["seconds"], "distill tok/s": dm["tokens"] / d["seconds"], "distill rss_mb": d["peak_rss_mb"],
                            "kl first→last": f"{dm['kl_first_steps']:.3f}→{dm['kl_last_steps']:.3f}"})
                if not args.keep:
                    shutil.rmtree(dst, ignore_errors=True)
            rows.append(row)
            print({k: v for k, v in row.items() if k != "candidates"}, flush=True)
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    cols = ["reduction", "method", "arch", "params", "non-emb", "ppl", "seconds", "peak_rss_mb", "ppl distilled", "distill tokens",
            "distill s", "distill tok/s", "distill rss_mb"]
    print_table(rows, cols, f"SmolLM2-135M pruned (calibration {args.calib_samples}x{args.calib_length} speech tokens), "
                            f"hamlet perplexity over {args.eval_windows}x512 tokens; arch = hidden/heads/ffn/layers")
    for row in rows:
        if "candidates" in row:
            print_table(row["candidates"], ["candidate", "params", "kl"], f"minitron candidates at {row['reduction']} fewer parameters")
    save("prune", {"rows": rows, "eval_windows": args.eval_windows, "calib": f"{args.calib_samples}x{args.calib_length}",
                   "distill": {"tokens": args.distill_tokens, "lr": args.distill_lr, "at": sorted(distill_at)}})


if __name__ == "__main__":
    main()
