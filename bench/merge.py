"""Merge throughput and memory vs the raw read rate of the same files (and mergekit).

    .venv/bin/python bench/merge.py [--skip-mergekit] [--skip-fp8] [--workers N ...] [--mergekit-venv DIR]

(a) Two random Llama-3.2-1B-shaped bf16 parents (~2.5 GB each, sharded at 1 GB), cached in
--scratch. In one run: the raw read of the parents' files (`cat` to /dev/null, page cache warm),
weightsmith's 50/50 interpolation and pure selection, and mergekit 0.1.5's linear merge on the
same inputs when .venv-mergekit exists (see bench/anchors/mergekit.txt). Throughput = bytes of
parent files the job must read / wall time; every job runs as its own process and reports its
peak RSS (os.wait4). Wall time includes process start-up (imports, ~5-10 s on this machine) and
the manifest's sha256 of the outputs; the parents' sha256 (cached by path, size, mtime and inode,
so paid once per parent) is measured first as its own row. `streaming_mb_per_s` is the merge loop
alone (weightsmith prints it), which is what dominates on a 700 GB merge. A naive reference loop
(safetensors safe_open per shard, (a+b)/2 in bf16, save_file) runs on the same inputs too.
(b) A DeepSeek-V3-shaped fp8 pair (hidden 7168, real MLA shapes, experts 2048x7168 with 128x128
block scales; 2 layers, 16 routed experts, vocab cut to 16k): the R1T Chimera rule (routed experts
from the second parent, pure selection) and a 50/50 interpolation (dequantize, merge,
requantize).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, save  # noqa: E402
from quant import run_child  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent
NAIVE = """
import sys, time
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
a, b, out = map(Path, sys.argv[1:4])
out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
for f in sorted(a.glob("*.safetensors")):
    res = {}
    with safe_open(f, "pt") as fa, safe_open(b / f.name, "pt") as fb:
        for k in fa.keys():
            res[k] = (fa.get_tensor(k) + fb.get_tensor(k)) / 2
    save_file(res, out / f.name, metadata={"format": "pt"})
    del res
print(f"loop {time.perf_counter() - t0:.2f} s")
"""

ARCHITECTURES = {"llama": "LlamaForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
LLAMA_1B = dict(
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    rope_theta=500000.0,
)
V3_SHAPED = dict(
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    n_routed_experts=16,
    n_shared_experts=1,
    num_experts_per_tok=8,
    n_group=1,
    topk_group=1,
    num_attention_heads=128,
    num_key_value_heads=128,
    q_lora_rank=1536,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    vocab_size=16384,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def random_checkpoint(
    dst: Path, model_type: str, shape: dict, *, seed: int, fp8: bool = False, shard: str = "1GB"
) -> Path:
    """A random checkpoint with the family's exact tensor names and shapes (from the skeleton)."""
    import torch
    from transformers import AutoConfig

    from weightsmith.arch import arch_for
    from weightsmith.checkpoint.fp8 import quantize_blockwise
    from weightsmith.checkpoint.writer import CheckpointWriter, TensorSpec
    from weightsmith.engine.skeleton import build_skeleton
    from weightsmith.util import parse_size

    if (dst / "config.json").exists():
        return dst
    cfg = AutoConfig.for_model(model_type, dtype="bfloat16", **shape)
    cfg.architectures = [ARCHITECTURES[model_type]]  # as in every checkpoint saved by transformers
    view = arch_for(cfg)
    expected = set(view.expected_tensors())
    shapes = {}
    for path, p in list(build_skeleton(cfg, view, torch.bfloat16).named_parameters()):
        mod, _, pn = path.rpartition(".")
        name = view.module_to_disk(mod) + "." + pn
        if name in expected:
            shapes[name] = tuple(p.shape)
    quantized = {
        n for n, s in shapes.items() if fp8 and len(s) == 2 and view.classify(n) not in ("embed", "lm_head", "router")
    }
    specs = []
    for n, s in shapes.items():
        if n in quantized:
            specs += [
                TensorSpec(n, s, torch.float8_e4m3fn),
                TensorSpec(n + "_scale_inv", (-(-s[0] // 128), -(-s[1] // 128)), torch.float32),
            ]
        else:
            specs.append(TensorSpec(n, s, torch.bfloat16))
    if fp8:
        cfg.quantization_config = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "weight_block_size": [128, 128],
            "activation_scheme": "dynamic",
        }
    gen = torch.Generator().manual_seed(seed)
    with CheckpointWriter(dst, force=True, max_shard_size=parse_size(shard)) as w:
        w.plan(specs)
        for n, s in shapes.items():
            t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen).mul_(1 / s[-1] ** 0.5)
            if n in quantized:
                q, sc = quantize_blockwise(t)
                w.write(n, q)
                w.write(n + "_scale_inv", sc)
            else:
                w.write(n, t.to(torch.bfloat16))
        w.set_config(cfg)
        w.finalize()
    (dst / "manifest.json").unlink(missing_ok=True)  # plain parents, as downloaded
    return dst


def files_of(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def raw_read(parents: list[Path]) -> dict:
    files = [str(f) for p in parents for f in files_of(p)]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    import shlex

    r = run_child(["sh", "-c", "cat " + " ".join(map(shlex.quote, files)) + " > /dev/null"])
    size = sum(Path(f).stat().st_size for f in files)
    return {
        "job": "raw read (cat > /dev/null)",
        "input_gb": size / 1e9,
        "seconds": r["seconds"],
        "mb_per_s": size / 1e6 / r["seconds"],
        "peak_rss_mb": r["peak_rss_mb"],
    }


def raw_copy(parent: Path, scratch: Path) -> dict:
    """cp of one parent's files: what writing a same-size output costs on this disk."""
    dst = scratch / "cp-copy"
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir()
    files = [str(f) for f in files_of(parent)]
    r = run_child(["cp", *files, str(dst)])
    shutil.rmtree(dst, ignore_errors=True)
    size = sum(Path(f).stat().st_size for f in files)
    return {
        "job": "raw copy of one parent (cp)",
        "input_gb": size / 1e9,
        "seconds": r["seconds"],
        "mb_per_s": size / 1e6 / r["seconds"],
        "peak_rss_mb": r["peak_rss_mb"],
    }


def ours(label: str, out: Path, parents: list[Path], args: list[str], read_bytes: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(VENV / "weightsmith"), "merge", str(out), *sum((["--parent", str(p)] for p in parents), []), *args]
    r = run_child(cmd)
    if r["rc"] != 0:
        raise SystemExit(f"merge failed: {' '.join(cmd)}\n{r['output'][-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    import re

    m = re.search(r"merged \d+ tensors in ([0-9.]+) s", r["output"])
    stream = read_bytes / 1e6 / float(m.group(1)) if m else None
    return {
        "job": label,
        "input_gb": read_bytes / 1e9,
        "seconds": r["seconds"],
        "mb_per_s": read_bytes / 1e6 / r["seconds"],
        "streaming_mb_per_s": stream,
        "peak_rss_mb": r["peak_rss_mb"],
    }


def hash_parents(parents: list[Path]) -> dict:
    """sha256 of the parents' files as the manifest records them (cached afterwards)."""
    import time

    from weightsmith.checkpoint import manifest as mf

    t0 = time.perf_counter()
    for p in parents:
        mf.hash_dir_files(p, mf.input_files(p), use_cache=False)  # timed as a first merge pays it
    sec = time.perf_counter() - t0
    for p in parents:
        mf.hash_dir_files(p, mf.input_files(p))  # fill the cache the timed merges below use
    size = sum(f.stat().st_size for p in parents for f in files_of(p))
    return {
        "job": "sha256 of the parents (first merge only; cached)",
        "input_gb": size / 1e9,
        "seconds": sec,
        "mb_per_s": size / 1e6 / sec,
    }


def naive(out: Path, parents: list[Path]) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = run_child([sys.executable, "-c", NAIVE, str(parents[0]), str(parents[1]), str(out)])
    shutil.rmtree(out, ignore_errors=True)
    read = sum(f.stat().st_size for p in parents for f in files_of(p))
    if r["rc"] != 0:
        raise SystemExit(f"naive loop failed:\n{r['output'][-2000:]}")
    import re

    loop = float(re.search(r"loop ([0-9.]+) s", r["output"]).group(1))
    return {
        "job": "naive loop: safe_open, (a+b)/2, save_file",
        "input_gb": read / 1e9,
        "seconds": r["seconds"],
        "mb_per_s": read / 1e6 / r["seconds"],
        "streaming_mb_per_s": read / 1e6 / loop,
        "peak_rss_mb": r["peak_rss_mb"],
    }


def mergekit(mergekit_bin: Path, out: Path, parents: list[Path], scratch: Path) -> dict:
    cfg = scratch / "mergekit-linear.yml"
    cfg.write_text(
        "merge_method: linear\ndtype: bfloat16\nmodels:\n"
        + "".join(f"  - model: {p}\n    parameters:\n      weight: 0.5\n" for p in parents)
    )
    shutil.rmtree(out, ignore_errors=True)
    r = run_child([str(mergekit_bin), str(cfg), str(out), "--no-copy-tokenizer"])
    read = sum(f.stat().st_size for p in parents for f in files_of(p))
    row = {
        "job": "mergekit 0.1.5 linear 50/50",
        "input_gb": read / 1e9,
        "seconds": r["seconds"],
        "mb_per_s": read / 1e6 / r["seconds"],
        "peak_rss_mb": r["peak_rss_mb"],
    }
    if r["rc"] != 0:
        row["job"] += " (FAILED: " + r["output"].strip().splitlines()[-1][:120] + ")"
    else:
        row["output_files"] = sorted(p.name for p in out.iterdir())
    shutil.rmtree(out, ignore_errors=True)
    return row


def goals(rows: list[dict]) -> dict:
    """The issue's goals, from this run's rows (wall clock to wall clock)."""
    by = {r["job"]: r for r in rows}
    interp = [r for r in rows if r["job"].startswith("weightsmith interpolate")]
    best = max(interp, key=lambda r: r["mb_per_s"])
    out = {}
    mk = [r for r in rows if r["job"].startswith("mergekit") and "FAILED" not in r["job"]]
    if mk:
        out["interpolation / mergekit linear (wall)"] = best["mb_per_s"] / mk[0]["mb_per_s"]
        out["interpolation / mergekit linear (weightsmith loop only)"] = best["streaming_mb_per_s"] / mk[0]["mb_per_s"]
    out["interpolation / naive loop (wall)"] = (
        best["mb_per_s"] / by["naive loop: safe_open, (a+b)/2, save_file"]["mb_per_s"]
    )
    sel = by["weightsmith select (parent:1, all tensors)"]
    raw = by["raw read (cat > /dev/null)"]["mb_per_s"]
    out["selection / raw read (wall)"] = sel["mb_per_s"] / raw
    out["selection / raw read (loop only)"] = sel["streaming_mb_per_s"] / raw
    if len(interp) > 1:
        out[f"interpolation loop, {len(interp)} worker counts: most / fewest workers"] = (
            interp[-1]["streaming_mb_per_s"] / interp[0]["streaming_mb_per_s"]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench/merge")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-fp8", action="store_true")
    ap.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="worker counts to time the interpolation with"
    )
    ap.add_argument(
        "--mergekit-venv",
        default=str(ROOT / ".venv-mergekit"),
        help="virtual environment with mergekit 0.1.5 (see bench/anchors/mergekit.txt)",
    )
    args = ap.parse_args()
    mergekit_bin = Path(args.mergekit_venv) / "bin" / "mergekit-yaml"
    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    a = random_checkpoint(scratch / "llama1b-a", "llama", LLAMA_1B, seed=1)
    b = random_checkpoint(scratch / "llama1b-b", "llama", LLAMA_1B, seed=2)
    size = sum(f.stat().st_size for f in files_of(a))
    rows = [hash_parents([a, b]), raw_read([a, b]), raw_copy(b, scratch)]
    print(rows, flush=True)
    for w in args.workers:
        rows.append(
            ours(
                f"weightsmith interpolate 50/50 ({w} worker{'s' if w > 1 else ''})",
                scratch / "out",
                [a, b],
                ["--weights", "0.5,0.5", "--workers", str(w)],
                2 * size,
            )
        )
        print(rows[-1], flush=True)
    rows.append(
        ours("weightsmith select (parent:1, all tensors)", scratch / "out", [a, b], ["--weights", "parent:1"], size)
    )
    print(rows[-1], flush=True)
    rows.append(naive(scratch / "out-naive", [a, b]))
    print(rows[-1], flush=True)
    if not args.skip_mergekit and mergekit_bin.exists():
        rows.append(mergekit(mergekit_bin, scratch / "out-mk", [a, b], scratch))
        print(rows[-1], flush=True)
    raw = rows[1]["mb_per_s"]
    for r in rows:
        r["vs_raw_read"] = r["mb_per_s"] / raw
    print_table(
        rows,
        ["job", "input_gb", "seconds", "mb_per_s", "vs_raw_read", "streaming_mb_per_s", "peak_rss_mb"],
        f"(a) Llama-3.2-1B-shaped bf16 pair, {size / 1e9:.2f} GB each",
    )
    payload = {"llama1b": rows, "goals": goals(rows)}
    for k, v in payload["goals"].items():
        print(f"{k}: {v:.2f}")
    if not args.skip_fp8:
        v3 = random_checkpoint(scratch / "v3-fp8-a", "deepseek_v3", V3_SHAPED, seed=3, fp8=True)
        r1 = random_checkpoint(scratch / "v3-fp8-b", "deepseek_v3", V3_SHAPED, seed=4, fp8=True)
        from weightsmith.checkpoint.reader import Checkpoint

        A = Checkpoint(v3)
        total = sum(i.nbytes for i in A.infos())
        experts = sum(i.nbytes for i in A.infos() if ".mlp.experts." in i.name)
        frows = [hash_parents([v3, r1]), raw_read([v3, r1])]
        frows.append(
            ours(
                "chimera: routed experts from parent 1 (select)",
                scratch / "out",
                [v3, r1],
                ["--weights", "parent:0", "--rule", "group:routed_experts=parent:1"],
                total,
            )
        )
        frows.append(
            ours("interpolate 50/50, requantize fp8", scratch / "out", [v3, r1], ["--weights", "0.5,0.5"], 2 * total)
        )
        raw = frows[1]["mb_per_s"]
        for r in frows:
            r["vs_raw_read"] = r["mb_per_s"] / raw
        print_table(
            frows,
            ["job", "input_gb", "seconds", "mb_per_s", "vs_raw_read", "streaming_mb_per_s", "peak_rss_mb"],
            f"(b) DeepSeek-V3-shaped fp8 pair, {total / 1e9:.2f} GB each ({experts / 1e9:.2f} GB routed experts)",
        )
        payload["v3_fp8"] = frows
    save("merge", payload)


if __name__ == "__main__":
    main()
