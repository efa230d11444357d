"""GQA→MLA on SmolLM2-135M: training-free perplexity at 100/50/25/12.5% of the source KV cache.

    .venv/bin/python bench/mla.py [--ratios 1 0.5 0.25 0.125] [--methods transmla mha2mla]
                                  [--targets exact engine] [--windows 16] [--length 512]
                                  [--extra=--pca-metric=auto --name mla-auto]
                                  [--anchor [--anchor-ratios 1 0.5 0.25] [--anchor-freqfolds 1 2 4]]
                                  [--jobs 2] [--anchor-rows-from mla-anchor ...]

Calibration: political_data.json ("speeches" field), evaluation: hamlet.txt (non-overlapping
windows). Each conversion runs as its own `weightsmith mla` process, so its wall time and peak RSS
are its own. Every output is loaded with plain transformers (DeepseekV3ForCausalLM) to measure it.
Timings on a shared machine are noisy; re-run on a quiet one before publishing them.

Baseline rows ("plain SVD"): the most naive conversion of the same size, for TransMLA to beat:
mha2mla's machinery with the highest frequencies kept for RoPE in every head (`--partial-rope
high`) and separate truncated SVDs of W_k_nope and W_v (`--svd split`), weight-only, no
calibration. Run at --baseline-ratios on the exact target.

--anchor: TransMLA's own code (github.com/fxmeng/TransMLA, transmla/transmla, commit 9c0d254) in its
own venv (--anchor-python, default .venv-transmla/bin/python; pins in
bench/anchors/transmla.txt), run by bench/anchors/run_transmla.py on the *same* calibration windows
(exported from weightsmith's calibration loader) and the same evaluation windows, at each
--anchor-ratios budget (RoPE key 64 = its default qk_mqa_dim, latent = budget − 64) and each
--anchor-freqfolds. Its rows are evaluated in memory with its own LlamaMLA modules (no latent norm,
full-precision fp32), not through stock transformers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, print_table, provenance, save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    ap.add_argument("--methods", nargs="+", default=["transmla", "mha2mla"])
    ap.add_argument("--targets", nargs="+", default=["exact", "engine"])
    ap.add_argument(
        "--baseline-ratios",
        type=float,
        nargs="*",
        default=[0.5, 0.25],
        help="ratios for the plain-SVD rows (none: skip)",
    )
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-length", type=int, default=256)
    ap.add_argument(
        "--extra", nargs="*", default=[], help="more `weightsmith mla` options, e.g. --extra=--pca-metric=auto"
    )
    ap.add_argument("--name", default="mla", help="results file bench/results/NAME.json")
    ap.add_argument(
        "--jobs", type=int, default=1, help="conversions run at once (each its own process; wall times then overlap)"
    )
    ap.add_argument(
        "--anchor-rows-from",
        nargs="*",
        default=[],
        help="print (and keep) the TransMLA rows of earlier --anchor-only runs, bench/results/NAME.json, beside "
        "this run's; their commits and dates are recorded with them",
    )
    ap.add_argument(
        "--anchor", action="store_true", help="also run TransMLA's own code (see --anchor-python, --anchor-src)"
    )
    ap.add_argument("--anchor-only", action="store_true", help="run only the original and the anchor rows")
    ap.add_argument("--anchor-python", default=".venv-transmla/bin/python")
    ap.add_argument(
        "--anchor-src",
        default="/tmp/transmla/transmla/transmla",
        help="the transmla/transmla folder of a TransMLA checkout",
    )
    ap.add_argument("--anchor-ratios", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--anchor-freqfolds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--anchor-rope-dim", type=int, default=64)
    ap.add_argument(
        "--fill",
        action="store_true",
        help="keep the finished rows of ours in bench/results/NAME.json (same protocol and source ppl, else it "
        "refuses); run only the missing or failed ones of this run's list",
    )
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.assets import hamlet, political_speeches, smollm2_gguf
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows

    ws = str(Path(sys.executable).with_name("weightsmith"))
    rows = []
    with tempfile.TemporaryDirectory() as td:
        base = Path(td) / "smollm2"
        subprocess.run([ws, "import", str(smollm2_gguf()), str(base)], check=True, capture_output=True)
        tok = AutoTokenizer.from_pretrained(base)
        wins = token_windows(tok, read_text(hamlet()), args.length, args.windows, source="hamlet.txt")

        def ppl(path):
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return perplexity(m, wins)["perplexity"], type(m).__name__

        p0, _ = ppl(base)
        print(f"original: ppl {p0:.3f}", flush=True)
        runs = [(m, m, t, r, args.extra) for m in args.methods for t in args.targets for r in args.ratios]
        runs += [
            ("plain SVD", "mha2mla", "exact", r, ["--partial-rope", "high", "--svd", "split"])
            for r in args.baseline_ratios
        ]
        if args.anchor_only:
            runs = []
        done = {}
        if args.fill and (RESULTS / f"{args.name}.json").exists():
            prev = json.loads((RESULTS / f"{args.name}.json").read_text())
            same = ("windows", "length", "calib_samples", "calib_length", "extra")
            if any(prev["args"].get(k) != getattr(args, k) for k in same):
                raise SystemExit(f"--fill: bench/results/{args.name}.json was run with other {'/'.join(same)}")
            src = next(r for r in prev["rows"] if r["method"].startswith("original"))
            if abs(src["ppl"] - p0) > 1e-9 * p0:
                raise SystemExit(f"--fill: bench/results/{args.name}.json has source ppl {src['ppl']} ≠ {p0}")
            filled = {"filled from": prev["command"], "filled from commit": prev.get("git_commit", "not recorded")}
            done = {
                (r["method"], r["target"], r["KV %"]): {"filled from": filled, **r}
                for r in prev["rows"]
                if "ppl" in r and not r["method"].startswith(("original", "TransMLA"))
            }
        rows.append(
            {"method": "original (llama GQA)", "target": "—", "KV %": 100.0, "KV values/token": 30 * 384, "ppl": p0}
        )

        def convert(job):
            label, method, target, ratio, extra = job
            out = Path(td) / f"{label.replace(' ', '-')}-{target}-{ratio}"
            cmd = [
                ws,
                "mla",
                str(base),
                str(out),
                "--method",
                method,
                "--target",
                target,
                "--kv-ratio",
                str(ratio),
                "--calib",
                str(political_speeches()),
                "--calib-field",
                "speeches",
                "--calib-samples",
                str(args.calib_samples),
                "--calib-length",
                str(args.calib_length),
                *extra,
            ]
            t = time.perf_counter()
            r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
            return out, r, time.perf_counter() - t

        todo = [n for n, job in enumerate(runs) if (job[0], job[2], 100 * job[3]) not in done]
        # conversions run --jobs at a time (each its own process: its time and RSS are its own);
        # perplexities are measured here, one model at a time, in the order of `runs`
        pool = ThreadPoolExecutor(max(1, args.jobs))
        futures = {n: pool.submit(convert, runs[n]) for n in todo}
        for n, (label, method, target, ratio, extra) in enumerate(runs):
            if n not in futures:
                rows.append(done[(label, target, 100 * ratio)])
                continue
            out, r, secs = futures[n].result()
            row = {"method": label, "target": target, "KV %": 100 * ratio}
            if r.returncode != 0:
                lines = [
                    ln
                    for ln in r.stderr.strip().splitlines()
                    if ln and not ln.startswith("Command exited") and not ln.isdigit()
                ]
                row["note"] = next(
                    (ln for ln in reversed(lines) if ln.startswith("Error")), lines[-1] if lines else "failed"
                )[:160]
                rows.append(row)
                print(row, flush=True)
                continue
            rss = int(r.stderr.strip().splitlines()[-1]) / 1024
            met = json.loads((out / "manifest.json").read_text())["metrics"]
            p, arch = ppl(out)
            row.update(
                {
                    "KV values/token": met["kv_cache_after"]["values_per_token"],
                    "rope dim": met["qk_rope_head_dim"],
                    "latent": met["kv_lora_rank"],
                    "ppl": p,
                    "Δppl": p - p0,
                    "attn err": met["mean_attention_output_error"],
                    "convert s": secs,
                    "peak RSS MB": rss,
                    "loads as": arch,
                    "rope_dim_search": met.get("rope_dim_search"),
                    "freqfold_search": met.get("freqfold_search"),
                    "freqfold per layer": [m_["freqfold"] for m_ in met["layers"]],
                }
            )
            rows.append(row)
            save(args.name, {"rows": rows, "args": vars(args), "partial": True})  # survives an interrupted run
            print({k: row[k] for k in ("method", "target", "KV %", "rope dim", "ppl", "convert s")}, flush=True)
            subprocess.run(["rm", "-rf", str(out)])
        pool.shutdown()
        planned = {(job[0], job[2], 100 * job[3]) for job in runs}
        rows += [r for k, r in done.items() if k not in planned]  # --fill keeps every finished row of ours
        if args.anchor or args.anchor_only:
            rows += anchor_rows(args, base, tok, wins, p0, Path(td))
        for name in args.anchor_rows_from:
            rows += earlier_anchor_rows(name, p0)
        for row in rows:
            if row.get("ppl") is not None:
                row["ppl ÷ source"] = row["ppl"] / p0
    cols = [
        "method",
        "target",
        "KV %",
        "KV values/token",
        "rope dim",
        "latent",
        "ppl",
        "ppl ÷ source",
        "Δppl",
        "attn err",
        "convert s",
        "peak RSS MB",
    ]
    print_table(
        rows, cols, f"SmolLM2-135M → MLA, training-free, hamlet ppl ({args.windows} × {args.length} tokens, fp32, CPU)"
    )
    save(args.name, {"rows": rows, "args": vars(args), **provenance()})


def earlier_anchor_rows(name: str, p0: float) -> list[dict]:
    """The TransMLA rows of an earlier run on the same protocol (its source ppl must match this run's)."""
    prev = json.loads((RESULTS / f"{name}.json").read_text())
    src = next(r for r in prev["rows"] if r["method"].startswith("original"))
    if abs(src["ppl"] - p0) > 1e-6 * p0:
        raise SystemExit(f"bench/results/{name}.json: source ppl {src['ppl']} ≠ this run's {p0}: not the same protocol")
    at = {"anchor run": f"{name}.json", "anchor commit": prev.get("git_commit"), "anchor date": prev.get("date")}
    return [{**r, **at} for r in prev["rows"] if r["method"].startswith("TransMLA")]


def anchor_rows(args, base: Path, tok, wins, p0: float, td: Path) -> list[dict]:
    """TransMLA's own conversion on the same calibration and evaluation windows (its own venv)."""
    import torch
    from transformers import AutoConfig

    from weightsmith.assets import political_speeches
    from weightsmith.calib.config import CalibConfig
    from weightsmith.calib.windows import load_calibration

    py, src = Path(args.anchor_python), Path(args.anchor_src)
    if not py.exists():
        raise SystemExit(
            f"{py}: missing; create it with: python3.11 -m venv {py.parent.parent} && {py.parent}/pip install -r "
            "bench/anchors/transmla.txt"
        )
    if not (src / "partial_rope.py").exists():
        raise SystemExit(
            f"{src}/partial_rope.py: missing; --anchor-src must be the transmla/transmla folder of a checkout of "
            "github.com/fxmeng/TransMLA"
        )
    calib = load_calibration(
        CalibConfig(
            calib=str(political_speeches()),
            calib_field="speeches",
            calib_samples=args.calib_samples,
            calib_length=args.calib_length,
        ),
        tok,
    )
    torch.save(calib.ids, td / "calib.pt")
    torch.save(wins, td / "eval.pt")
    cfg = AutoConfig.from_pretrained(base)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    S = 2 * cfg.num_key_value_heads * d
    rows = []
    for ratio in args.anchor_ratios:
        rank = int(round(ratio * S)) - args.anchor_rope_dim
        cmd = [
            str(py),
            str(Path(__file__).parent / "anchors" / "run_transmla.py"),
            str(src),
            str(base),
            str(td / "calib.pt"),
            str(td / "eval.pt"),
            "--kv-lora-rank",
            str(rank),
            "--qk-mqa-dim",
            str(args.anchor_rope_dim),
        ]
        for f in args.anchor_freqfolds:
            cmd += ["--freqfold", str(f)]
        proc = subprocess.Popen(
            ["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        theirs_p0 = None
        for ln in proc.stdout:  # one JSON line per FreqFold, kept as it arrives (an interrupted run keeps its rows)
            if not ln.startswith("{"):
                continue
            o = json.loads(ln)
            if "source_ppl" in o:
                theirs_p0 = o["source_ppl"]
                continue
            row = {
                "method": f"TransMLA code, FreqFold {o['freqfold']}",
                "target": "own modeling",
                "KV %": 100 * ratio,
                "KV values/token": cfg.num_hidden_layers * (rank + args.anchor_rope_dim),
                "rope dim": args.anchor_rope_dim,
                "latent": rank,
                "ppl": o["ppl"],
                "ppl ÷ source": o["ppl"] / p0,
                "Δppl": o["ppl"] - p0,
                "convert s": o["convert_s"],
                "source ppl (anchor venv)": theirs_p0,
            }
            rows.append(row)
            save(f"{args.name}-anchor-partial", {"rows": rows, "args": vars(args), "partial": True, **provenance()})
            print({k: row[k] for k in ("method", "KV %", "ppl", "convert s")}, flush=True)
        err = proc.stderr.read()
        if proc.wait() != 0:
            rows.append(
                {
                    "method": "TransMLA code",
                    "target": "own modeling",
                    "KV %": 100 * ratio,
                    "note": (err.strip().splitlines() or ["failed"])[-2 if len(err.strip().splitlines()) > 1 else -1][
                        :160
                    ],
                }
            )
            print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    main()
