"""Proof of bounded memory: the layer-wise engine over a random Llama-7B-shaped bf16 checkpoint.

    .venv/bin/python bench/memory.py [--scratch DIR] [--layers 16 32] [--samples 4] [--length 512]

Writes random Llama-2-7B-shaped checkpoints (hidden 4096, FFN 11008, 32 heads, vocab 32000; bf16,
5 GB shards) with 16 and 32 layers into a scratch directory (kept for re-runs), then, in a fresh
process per variant, runs the engine with a pass that only accumulates XᵀX of every linear input
(fp32 compute, fp32 statistics). Prints peak RSS and wall time per layer; the goal is peak RSS
under 3 GB and flat in the number of layers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_mb, print_table, save  # noqa: E402

SHAPE = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)


def write_random_checkpoint(dst: Path, layers: int, **shape) -> Path:
    import torch
    from transformers import LlamaConfig

    from weightsmith.arch import arch_for
    from weightsmith.checkpoint.writer import CheckpointWriter, TensorSpec

    if (dst / "config.json").exists() and json.loads((dst / "config.json").read_text()).get(
        "num_hidden_layers"
    ) == layers:
        return dst
    cfg = LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", tie_word_embeddings=False, **{**SHAPE, **shape})
    view = arch_for(cfg)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes = {view.family.embed: (v, h), view.family.final_norm: (h,), view.family.lm_head: (v, h)}
    for i in range(layers):
        for lin in view.linears(i):
            shapes[lin.prefix + ".weight"] = {
                "q": (h, h),
                "k": (h, h),
                "v": (h, h),
                "o": (h, h),
                "gate": (f, h),
                "up": (f, h),
                "down": (h, f),
            }[lin.role]
        for n in view.layer_norms(i).values():
            shapes[n + ".weight"] = (h,)
    gen = torch.Generator().manual_seed(0)
    shutil.rmtree(
        dst, ignore_errors=True
    )  # our own scratch model of another depth (the writer replaces only manifest-carrying outputs)
    with CheckpointWriter(dst) as w:
        w.plan([TensorSpec(n, s, torch.bfloat16) for n, s in shapes.items()])
        for n, s in shapes.items():
            t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * (1 / s[-1] ** 0.5)
            w.write(n, t.to(torch.bfloat16))
        w.set_config(cfg)
        w.finalize()
    return dst


def child(path: str, samples: int, length: int) -> None:
    """Runs in a fresh process so that its peak RSS is the engine's alone."""
    import psutil
    import torch

    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.engine import LayerwiseEngine
    from weightsmith.engine.stats import Gram

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ck = Checkpoint(path)
    eng = LayerwiseEngine(ck, device="cpu", dtype=torch.float32, batch_size=2)
    ids = torch.randint(0, eng.view.vocab, (samples, length), generator=torch.Generator().manual_seed(0))
    proc = psutil.Process()
    per_layer = []

    def xtx_only(layer):
        grams = {lin.prefix: Gram(layer.in_features(lin.prefix)) for lin in layer.view.linears(layer.index)}
        layer.run(observe=grams, keep_outputs=False)
        per_layer.append({"layer": layer.index, "rss_mb": proc.memory_info().rss / 2**20})

    t0 = time.perf_counter()
    eng.run(ids, xtx_only)
    total = time.perf_counter() - t0
    eng.close()
    for st, row in zip(eng.layer_stats, per_layer):
        row["seconds"] = st.seconds
    print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": total, "per_layer": per_layer}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench")
    ap.add_argument("--layers", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.samples, args.length)
        return
    rows, details = [], {}
    for n in args.layers:
        path = Path(args.scratch) / f"llama7b-shaped-{n}L"
        t = time.perf_counter()
        write_random_checkpoint(path, n)
        size_gb = sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e9
        print(
            f"checkpoint {path}: {size_gb:.1f} GB ({time.perf_counter() - t:.0f} s to write or reuse)", file=sys.stderr
        )
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(path),
                "--samples",
                str(args.samples),
                "--length",
                str(args.length),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            sys.exit(out.stderr)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        secs = [r["seconds"] for r in res["per_layer"]]
        rss = [r["rss_mb"] for r in res["per_layer"]]
        rows.append(
            {
                "layers": n,
                "checkpoint GB": size_gb,
                "calib tokens": args.samples * args.length,
                "peak RSS GB": res["peak_rss_mb"] / 1024,
                "RSS after layer 1 GB": rss[0] / 1024,
                "RSS after last layer GB": rss[-1] / 1024,
                "s/layer (median)": sorted(secs)[len(secs) // 2],
                "total s": res["seconds"],
            }
        )
        details[n] = res
    print_table(
        rows,
        list(rows[0]),
        "Layer-wise engine, random Llama-7B-shaped bf16 checkpoint, XᵀX of every linear input (fp32), CPU",
    )
    save("memory", {"rows": rows, "details": details})


if __name__ == "__main__":
    main()
