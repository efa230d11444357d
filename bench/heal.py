"""Healing after GQA→MLA: perplexity against logit-distillation tokens (`weightsmith distill` after `mla`).

    .venv/bin/python bench/heal.py [--target engine] [--kv-ratio 0.5] [--tokens 0 2048 8192 32768 131072]
                                   [--max-minutes 30] [--windows 16] [--name mla-heal]

One conversion (SmolLM2-135M-Instruct, `weightsmith mla --method transmla`, calibration on
political_data.json "speeches"), then for each token budget N a separate `weightsmith distill MLA
SOURCE --tokens N` from that conversion (teacher: the source; training text: the same speeches
corpus; each budget is its own run with its own learning-rate schedule, as a user with that budget
would run it), evaluated on hamlet.txt windows like bench/mla.py. N = 0 is the conversion itself.
Budgets stop being started once --max-minutes of wall time have passed (the machine is recorded:
CPU count and load average at the start and at the end).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, provenance, save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="engine", choices=["exact", "engine"])
    ap.add_argument("--kv-ratio", type=float, default=0.5)
    ap.add_argument("--tokens", type=int, nargs="+", default=[0, 2048, 8192, 32768, 131072])
    ap.add_argument("--max-minutes", type=float, default=30.0, help="start no new budget after this much wall time")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=16, help="mla calibration windows")
    ap.add_argument("--calib-length", type=int, default=256, help="mla calibration and distillation window length")
    ap.add_argument("--batch-size", type=int, default=4, help="distillation windows per step")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--mla-extra", nargs="*", default=["--rope-dim=64"], help="more `weightsmith mla` options")
    ap.add_argument("--name", default="mla-heal", help="results file bench/results/NAME.json")
    ap.add_argument(
        "--converted",
        help="an existing `weightsmith mla` output of this SmolLM2 to heal instead of converting here (its manifest's "
        "parameters are recorded; --target, --kv-ratio, --calib-* and --mla-extra are then not used)",
    )
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.assets import hamlet, political_speeches, smollm2_gguf
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows

    ws = str(Path(sys.executable).with_name("weightsmith"))
    speeches = ["--calib", str(political_speeches()), "--calib-field", "speeches"]
    start = time.perf_counter()
    load0 = os.getloadavg()
    rows: list[dict] = []
    meta = {"args": vars(args), "cpu_count": os.cpu_count(), "load_avg_start": load0}
    with tempfile.TemporaryDirectory() as td:
        base, mla = Path(td) / "smollm2", Path(td) / "mla"
        subprocess.run([ws, "import", str(smollm2_gguf()), str(base)], check=True, capture_output=True)
        tok = AutoTokenizer.from_pretrained(base)
        wins = token_windows(tok, read_text(hamlet()), args.length, args.windows, source="hamlet.txt")

        def ppl(path):
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return perplexity(m, wins)["perplexity"]

        p0 = ppl(base)
        print(f"source ppl {p0:.3f}", flush=True)
        if args.converted:
            mla = Path(args.converted)
            man = json.loads((mla / "manifest.json").read_text())
            meta["converted"] = {"path": str(mla), "parameters": man["parameters"], "calibration": man["calibration"]}
        else:
            t = time.perf_counter()
            cmd = [ws, "mla", str(base), str(mla), "--method", "transmla", "--target", args.target]
            cmd += ["--kv-ratio", str(args.kv_ratio), *speeches, "--calib-samples", str(args.calib_samples)]
            cmd += ["--calib-length", str(args.calib_length), *args.mla_extra]
            subprocess.run(cmd, check=True, capture_output=True)
            meta["mla_seconds"] = time.perf_counter() - t
        for n in args.tokens:
            elapsed = (time.perf_counter() - start) / 60
            if elapsed > args.max_minutes:
                print(f"stopping before {n} tokens: {elapsed:.1f} min elapsed", flush=True)
                break
            row = {"tokens": n, "steps": 0, "distill s": 0.0}
            path = mla
            if n:
                path = Path(td) / f"heal-{n}"
                windows = -(-n // args.calib_length)
                t = time.perf_counter()
                r = subprocess.run(
                    [ws, "distill", str(mla), str(base), str(path), *speeches]
                    + ["--calib-samples", str(windows), "--calib-length", str(args.calib_length)]
                    + ["--tokens", str(n), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
                    + ["--save-every", "0", "--json"],
                    capture_output=True,
                    text=True,
                )
                row["distill s"] = time.perf_counter() - t
                if r.returncode:
                    row["note"] = (r.stderr.strip().splitlines() or ["failed"])[-1][:160]
                    rows.append(row)
                    print(row, flush=True)
                    break
                row["steps"] = -(-windows // args.batch_size)
            p = ppl(path)
            row.update({"ppl": p, "ppl ÷ source": p / p0})
            rows.append(row)
            print(row, flush=True)
            save(args.name, {"rows": rows, "source_ppl": p0, **meta, "partial": True, **provenance()})
            if path != mla:
                subprocess.run(["rm", "-rf", str(path)])
    meta["load_avg_end"] = os.getloadavg()
    meta["wall_minutes"] = (time.perf_counter() - start) / 60
    print_table(
        rows,
        ["tokens", "steps", "distill s", "ppl", "ppl ÷ source"],
        f"SmolLM2-135M → MLA ({args.target}, {100 * args.kv_ratio:g} % KV) healed by logit distillation; "
        f"hamlet ppl ({args.windows} × {args.length}), source {p0:.3f}",
    )
    save(args.name, {"rows": rows, "source_ppl": p0, **meta, **provenance()})
    print(json.dumps({"wall_minutes": meta["wall_minutes"]}))


if __name__ == "__main__":
    main()
