"""Calibration passes at world size 1 and 2 on SmolLM2-135M, and what that projects to at scale.

    .venv/bin/python bench/distributed.py [--passes gptq prune mla] [--world-sizes 1 2]
                                          [--calib-samples 16] [--calib-length 256] [--ppl-windows 8]

Each pass runs as its own job: world size 1 as one process, world size 2 under
`python -m torch.distributed.run --nproc-per-node 2` (gloo). Every rank runs this script's
`--worker` mode, which runs the CLI and reports the rank's wall time, its peak RSS, the collectives
and payload bytes it received through weightsmith.dist (`dist.traffic()`), the layer-wise engine's
per-layer seconds and forward passes, and (mla) the seconds of the conversion phase. Calibration:
political_data.json speeches, --calib-samples x --calib-length tokens; evaluation: hamlet.txt
perplexity of both outputs (--ppl-windows windows of 512 tokens).

What it measures on this machine: the CPU has 2 cores shared with other jobs (the load average
before and after each run is recorded), every rank runs with OMP_NUM_THREADS=1, so world size 2
uses two cores where world size 1 uses one. That tests the split of the work and the traffic, not
the speed-up of a cluster.

The projection (printed with its formula) takes the measured per-layer costs at world size 1 and
scales them to Llama-3-70B and DeepSeek-V3 on 8 nodes x 8 GPUs, per pass:

    T(P) = L * [ k * t_fwd * (F_t/F_s) * (N_t/N_s) / P  +  t_solve * (S_t/S_s) / min(P, J)
                 + t_conv * (C_t/C_s) / min(P, L) / L ] / g  +  L * B(P) / beta

t_fwd: measured seconds of one calibration forward of one SmolLM2 layer over N_s tokens (the
engine's per-layer time of prune's scoring run, one forward with cheap statistics); k: forward
passes per layer the pass makes (measured; prune on a MoE target adds one per extra expert
refit); t_solve: the rest of the per-layer time (measured
minus k forwards); t_conv: mla's conversion seconds after the layer loop (measured, all layers);
F, S, C: FLOPs of a layer's forward per token (2 x active parameters), of its solves (GPTQ
sum over modules of k^3 + n k^2; prune's least-squares refits; mla (hidden+1)^3) and of the
conversion, target (t) over SmolLM2 (s); N_t: projected calibration tokens; J: independent solves
per layer spread over owners (GPTQ: modules of the widest stage; prune: 1); g: how much faster one
GPU is than this process, = R_gpu / R_cpu with R_cpu the FLOP rate measured in t_fwd and R_gpu an
assumed effective rate (--gpu-tflops, not measured here); B(P): bytes each rank receives per layer,
2(P-1)/P x the statistics (dist.sum_ordered: reduce-scatter + all-gather) + (P-1)/P x what owners
broadcast (GPTQ's fp32 weights, prune's refitted columns, mla's scoring windows); the formula's
B(2) on SmolLM2 is printed next to the bytes counted by dist.traffic(); beta: assumed per-GPU
network bandwidth (--gbps, bytes per second). Every assumed input is in the results JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, provenance, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# published configs (config.json of meta-llama/Meta-Llama-3-70B and deepseek-ai/DeepSeek-V3)
TARGETS = {
    "Llama-3-70B": dict(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn=28672, moe=None),
    "DeepSeek-V3": dict(
        layers=61,
        dense_layers=3,
        hidden=7168,
        heads=128,
        q_lora=1536,
        kv_lora=512,
        nope=128,
        rope=64,
        v_head=128,
        ffn=18432,
        moe=dict(experts=256, active=8, shared=1, ffn=2048),
    ),
}


# ---- the worker: one rank of one job -------------------------------------------------------------


def worker(argv: list[str], out_dir: Path) -> int:
    import resource

    from weightsmith import dist
    from weightsmith.app.cli import main as cli_main
    from weightsmith.convert.mla import mla_pass
    from weightsmith.engine import layerwise

    engines: list = []
    init = layerwise.LayerwiseEngine.__init__

    def tracked_init(self, *a, **kw):
        init(self, *a, **kw)
        engines.append(self)

    layerwise.LayerwiseEngine.__init__ = tracked_init
    conv = {"seconds": 0.0}
    one_thread = mla_pass._one_thread

    @contextlib.contextmanager
    def timed_conversion():
        t = time.perf_counter()
        with one_thread():
            yield
        conv["seconds"] += time.perf_counter() - t

    mla_pass._one_thread = timed_conversion
    t0 = time.perf_counter()
    rc = cli_main(argv)
    seconds = time.perf_counter() - t0
    w = dist.world()
    report = {
        "rank": w.rank,
        "world_size": w.size,
        "rc": rc,
        "seconds": seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "traffic": dist.traffic(),
        "engine_runs": [
            {"seconds": [s.seconds for s in e.layer_stats], "forward_passes": [s.forward_passes for s in e.layer_stats]}
            for e in engines
        ],
        "conversion_seconds": conv["seconds"],
    }
    (out_dir / f"rank-{w.rank}.json").write_text(json.dumps(report))
    return rc


# ---- the driver ------------------------------------------------------------------------------------


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def launch(argv: list[str], size: int, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    me = [str(Path(__file__).resolve()), "--worker", json.dumps(argv), str(out_dir)]
    if size == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(size)]
        cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", *me]
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed at world size {size}: weightsmith {' '.join(argv)}\n{r.stderr[-3000:]}")
    ranks = [json.loads((out_dir / f"rank-{k}.json").read_text()) for k in range(size)]
    return {"wall_seconds": wall, "load_before": load_before, "load_after": os.getloadavg(), "ranks": ranks}


def perplexity(path: Path, text: Path, windows: int) -> float:
    cmd = [sys.executable, "-m", "weightsmith", "eval", str(path), "--text", str(text), "--windows", str(windows)]
    r = subprocess.run([*cmd, "--json"], env=_env(), capture_output=True, text=True, check=True)
    return float(json.loads(r.stdout)["perplexity"])


def max_rel_diff(a: Path, b: Path) -> tuple[float, int, int]:
    """Worst per-tensor max|Δ| / max|w| between two outputs, tensors that differ, tensors."""
    from weightsmith.checkpoint.reader import Checkpoint

    ca, cb = Checkpoint(a), Checkpoint(b)
    worst, differ, names = 0.0, 0, [i.name for i in ca.infos()]
    for n in names:
        x, y = ca.get(n), cb.get(n)
        if x.dtype.is_floating_point:
            x, y = x.double(), y.double()
            d = float((x - y).abs().max()) if x.numel() else 0.0
            worst = max(worst, d / max(float(x.abs().max()), 1e-30))
        else:
            d = float((x != y).any())
        differ += d > 0
    return worst, differ, len(names)


# ---- per-layer costs and the projection -------------------------------------------------------------


def smollm2_dims(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    return dict(
        layers=cfg["num_hidden_layers"],
        hidden=h,
        heads=heads,
        kv_heads=kv,
        head_dim=cfg.get("head_dim") or h // heads,
        ffn=cfg["intermediate_size"],
        moe=None,
    )


def layer_shapes(m: dict) -> list[tuple[str, int, int, str]]:
    """(module, out, in, input key) of one (MoE where the model has it) layer's linears."""
    H = m["hidden"]
    if "kv_lora" in m:  # DeepSeek MLA attention
        qk = m["nope"] + m["rope"]
        att = [
            ("q_a", m["q_lora"], H, "x"),
            ("q_b", m["heads"] * qk, m["q_lora"], "qa"),
            ("kv_a", m["kv_lora"] + m["rope"], H, "x"),
            ("kv_b", m["heads"] * (m["nope"] + m["v_head"]), m["kv_lora"], "kva"),
            ("o", H, m["heads"] * m["v_head"], "o"),
        ]
    else:
        d, q, kv = m["head_dim"], m["heads"], m["kv_heads"]
        att = [("q", q * d, H, "x"), ("k", kv * d, H, "x"), ("v", kv * d, H, "x"), ("o", H, q * d, "o")]
    if m["moe"]:
        e = m["moe"]
        mlp = []
        for j in range(e["experts"] + e["shared"]):
            f = e["ffn"]
            mlp += [(f"gate{j}", f, H, f"h{j}"), (f"up{j}", f, H, f"h{j}"), (f"down{j}", H, f, f"d{j}")]
    else:
        f = m["ffn"]
        mlp = [("gate", f, H, "h"), ("up", f, H, "h"), ("down", H, f, "d")]
    return att + mlp


def active_params(m: dict) -> float:
    """Parameters one token goes through in one layer (routed experts: the active ones)."""
    shapes = layer_shapes(m)
    if not m["moe"]:
        return float(sum(o * i for _, o, i, _ in shapes))
    e = m["moe"]
    per_expert = 3 * e["ffn"] * m["hidden"]
    att = sum(o * i for n, o, i, _ in shapes if n[:2] not in ("ga", "up", "do"))
    return float(att + (e["active"] + e["shared"]) * per_expert)


def costs(m: dict, pass_name: str, window: int) -> dict:
    """One layer's solve FLOPs, the statistics it reduces (bytes), what owners broadcast or send
    (bytes, fp32), and how many independent solves it has (spread over owners)."""
    shapes = layer_shapes(m)
    if pass_name == "gptq":  # one Hessian per distinct input; owners broadcast fp32 weights
        inputs = {key: i for _, _, i, key in shapes}
        return {
            "solve_flops": sum(float(i) ** 3 + float(o) * float(i) ** 2 for _, o, i, _ in shapes),
            "stat_bytes": 4.0 * sum(float(i) ** 2 for i in inputs.values()),
            "send_bytes": 4.0 * sum(float(o) * i for _, o, i, _ in shapes),
            "jobs": max(1, sum(1 for n, *_ in shapes if n[:1] in ("g", "u"))),  # the widest stage: gate/up
        }
    if pass_name == "prune":  # bench protocol --params 0.8 --axis mlp: ~20 % of the neurons go
        cons = [(o, i) for n, o, i, _ in shapes if n.startswith("down")]
        return {
            "solve_flops": sum((0.8 * i) ** 3 / 3 + 2.0 * (0.8 * i) ** 2 * o for o, i in cons),
            "stat_bytes": 4.0 * sum(float(i) ** 2 for _, i in cons),  # the Gram of every input channel
            "send_bytes": 4.0 * sum(float(o) * 0.8 * i for o, i in cons),
            "jobs": 1,
            "consumers": len(cons),  # each refit runs the layer once more (MoE: once per expert)
        }
    if pass_name == "mla":  # fp64 moments of [x; 1]; 8 scoring/refit windows go to the layer's owner
        H1 = m["hidden"] + 1
        return {
            "solve_flops": float(H1) ** 3,
            "stat_bytes": 8.0 * H1 * H1,
            "send_bytes": 4.0 * 8 * window * m["hidden"],
            "jobs": 1,
        }
    raise ValueError(pass_name)


def bytes_per_layer(c: dict, p: int) -> float:
    """Bytes one rank receives per layer: sum_ordered's reduce-scatter + all-gather of the
    statistics, and its share of what owners broadcast."""
    return 2 * (p - 1) / p * c["stat_bytes"] + (p - 1) / p * c["send_bytes"]


def measured_layer_costs(one: dict, fwd: list[float]) -> dict:
    """Per-layer seconds at world size 1: forwards per layer and the solve time left beyond them."""
    r = one["ranks"][0]
    L = len(fwd)
    t_fwd = sum(fwd) / L
    k = sum(sum(run["forward_passes"]) for run in r["engine_runs"]) / L
    layer_seconds = sum(sum(run["seconds"]) for run in r["engine_runs"]) / L
    return {
        "t_fwd": t_fwd,
        "forward_passes": k,
        "t_solve": max(0.0, layer_seconds - k * t_fwd),
        "t_conv": r["conversion_seconds"],
    }


def project(pass_name, meas, src, tgt, n_s, n_t, gpus, g, beta, window_s, window_t) -> dict:
    cs, ct = costs(src, pass_name, window_s), costs(tgt, pass_name, window_t)
    L = tgt["layers"]
    k = meas["forward_passes"] + ct.get("consumers", 0) - cs.get("consumers", 0)
    fwd = k * meas["t_fwd"] * (active_params(tgt) / active_params(src)) * (n_t / n_s) / gpus
    solve = meas["t_solve"] * (ct["solve_flops"] / cs["solve_flops"]) / min(gpus, ct["jobs"])
    conv = meas["t_conv"] / src["layers"] * (ct["solve_flops"] / cs["solve_flops"]) * L / min(gpus, L) / L
    compute = L * (fwd + solve + conv) / g
    b = bytes_per_layer(ct, gpus)
    comm = L * b / beta
    one = L * (k * meas["t_fwd"] * (active_params(tgt) / active_params(src)) * (n_t / n_s)
               + meas["t_solve"] * (ct["solve_flops"] / cs["solve_flops"])
               + meas["t_conv"] / src["layers"] * (ct["solve_flops"] / cs["solve_flops"])) / g  # fmt: skip
    return {
        "hours_1_gpu": one / 3600,
        "hours": (compute + comm) / 3600,
        "compute_hours": compute / 3600,
        "comm_hours": comm / 3600,
        "bytes_per_layer_per_rank": b,
        "speedup": one / (compute + comm),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2, metavar=("ARGV_JSON", "OUT_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--passes", nargs="+", default=["gptq", "prune", "mla"])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-length", type=int, default=256)
    ap.add_argument("--ppl-windows", type=int, default=8)
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench/distributed")
    ap.add_argument("--gpus", type=int, default=64, help="projection: 8 nodes x 8 GPUs")
    ap.add_argument("--gpu-tflops", type=float, default=100.0, help="projection: assumed effective fp32 TFLOP/s")
    ap.add_argument("--gbps", type=float, default=50.0, help="projection: assumed GB/s per GPU between nodes")
    ap.add_argument("--proj-tokens", type=int, default=128 * 2048, help="projection: calibration tokens")
    ap.add_argument("--proj-window", type=int, default=2048, help="projection: tokens per calibration window")
    args = ap.parse_args()
    if args.worker:
        sys.exit(worker(json.loads(args.worker[0]), Path(args.worker[1])))

    from quant import smollm2  # noqa: E402  (bench/quant.py: the imported SmolLM2 checkpoint)
    from weightsmith.assets import hamlet, political_speeches

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    src = smollm2(scratch)
    calib = ["--calib", str(political_speeches()), "--calib-field", "speeches"]
    calib += ["--calib-samples", str(args.calib_samples), "--calib-length", str(args.calib_length)]
    passes = {
        "gptq": ["quant", str(src), None, "--method", "gptq", "--bits", "4", "--group-size", "128", *calib],
        "prune": ["prune", str(src), None, "--params", "0.8", "--axis", "mlp", *calib],
        "mla": ["mla", str(src), None, "--kv-ratio", "0.5", *calib],
    }
    rows, runs = [], {}
    for name in args.passes:
        for size in args.world_sizes:
            out = scratch / f"{name}-ws{size}"
            shutil.rmtree(out, ignore_errors=True)
            argv = [str(out) if a is None else a for a in passes[name]]
            print(f"{name} at world size {size} ...", flush=True)
            res = launch(argv, size, scratch / f"report-{name}-ws{size}")
            res["ppl"] = perplexity(out, hamlet(), args.ppl_windows) if args.ppl_windows else None
            runs[(name, size)] = res
            L = len(res["ranks"][0]["engine_runs"][0]["seconds"]) if res["ranks"][0]["engine_runs"] else 1
            row = {
                "pass": name,
                "world size": size,
                "wall s": res["wall_seconds"],
                "peak RSS MB per rank": " / ".join(f"{r['peak_rss_mb']:.0f}" for r in res["ranks"]),
                "MB received per layer per rank": " / ".join(
                    f"{r['traffic']['bytes_received'] / L / 1e6:.2f}" for r in res["ranks"]
                ),
                "collectives": res["ranks"][0]["traffic"]["collectives"],
                "load before/after": f"{res['load_before'][0]:.1f} / {res['load_after'][0]:.1f}",
                "ppl": res["ppl"],
            }
            if size != args.world_sizes[0]:
                base = scratch / f"{name}-ws{args.world_sizes[0]}"
                worst, differ, total = max_rel_diff(base, out)
                row["vs world size 1"] = f"{differ}/{total} tensors differ, worst rel {worst:.2g}"
            rows.append(row)
    cols = ["pass", "world size", "wall s", "peak RSS MB per rank", "MB received per layer per rank", "collectives"]
    cols += ["load before/after", "ppl", "vs world size 1"]
    print_table(rows, cols, "measured on SmolLM2-135M (2 shared CPU cores, one thread per rank)")

    # ---- projection
    dims = smollm2_dims(src)
    n_s = args.calib_samples * args.calib_length
    payload_proj, proj_rows, layer_costs = [], [], {}
    fwd_layers = None
    if ("prune", 1) in runs:  # prune's scoring run: one forward per layer with channel statistics only
        fwd_layers = runs[("prune", 1)]["ranks"][0]["engine_runs"][0]["seconds"]
    if fwd_layers is None:
        print("\n(no projection: it needs prune at world size 1 for the forward cost)")
    else:
        t_fwd = sum(fwd_layers) / len(fwd_layers)
        r_cpu = 2 * active_params(dims) * n_s / t_fwd  # FLOP/s of one layer forward in this process
        g = args.gpu_tflops * 1e12 / r_cpu
        beta = args.gbps * 1e9
        print(
            "\nprojection: T(P) = L*[k*t_fwd*(F_t/F_s)*(N_t/N_s)/P + t_solve*(S_t/S_s)/min(P,J) "
            "+ t_conv*(C_t/C_s)/min(P,L)/L]/g + L*B(P)/beta"
        )
        print(
            f"  measured: t_fwd = {t_fwd:.3f} s per layer over N_s = {n_s} tokens -> "
            f"R_cpu = {r_cpu / 1e9:.2f} GFLOP/s; "
            f"assumed: R_gpu = {args.gpu_tflops} TFLOP/s (g = {g:.0f}), beta = {args.gbps} GB/s, "
            f"P = {args.gpus}, N_t = {args.proj_tokens}"
        )
        for name in args.passes:
            if (name, 1) not in runs:
                continue
            meas = measured_layer_costs(runs[(name, 1)], fwd_layers)
            layer_costs[name] = meas
            formula_b2 = bytes_per_layer(costs(dims, name, args.calib_length), 2)
            if (name, 2) in runs:
                got = [r["traffic"]["bytes_received"] / dims["layers"] for r in runs[(name, 2)]["ranks"]]
                meas["measured_bytes_per_layer_ws2"] = got
                print(
                    f"  {name}: k = {meas['forward_passes']:.2f}, t_solve = {meas['t_solve']:.3f} s/layer, "
                    f"t_conv = {meas['t_conv']:.1f} s; B(2) formula {formula_b2 / 1e6:.2f} MB/layer vs measured "
                    + " / ".join(f"{x / 1e6:.2f}" for x in got)
                    + " MB/layer (rank 0 / rank 1)"
                )
            for tname, tgt in TARGETS.items():
                if name == "mla" and tgt["moe"]:
                    proj_rows.append({"pass": name, "model": tname, "note": "already MLA (and MoE): not converted"})
                    continue
                p = project(
                    name,
                    meas,
                    dims,
                    tgt,
                    n_s,
                    args.proj_tokens,
                    args.gpus,
                    g,
                    beta,
                    args.calib_length,
                    args.proj_window,
                )
                payload_proj.append({"pass": name, "model": tname, **p})
                proj_rows.append(
                    {
                        "pass": name,
                        "model": tname,
                        "1 GPU h": p["hours_1_gpu"],
                        f"{args.gpus} GPUs h": p["hours"],
                        "of which comm h": p["comm_hours"],
                        "GB per layer per rank": p["bytes_per_layer_per_rank"] / 1e9,
                        "speed-up": p["speedup"],
                    }
                )
        print_table(
            proj_rows,
            ["pass", "model", "1 GPU h", f"{args.gpus} GPUs h", "of which comm h", "GB per layer per rank", "speed-up"],
            f"projection to {args.gpus} GPUs (assumptions above; MoE: experts' GPTQ spread over owners)",
        )
    save(
        "distributed",
        {
            **provenance(),
            "args": {k: v for k, v in vars(args).items() if k != "worker"},
            "rows": rows,
            "runs": {f"{n}-ws{s}": r for (n, s), r in runs.items()},
            "layer_costs": layer_costs,
            "projection": payload_proj,
            "projection_assumptions": {
                "gpu_tflops": args.gpu_tflops,
                "gbps": args.gbps,
                "gpus": args.gpus,
                "tokens": args.proj_tokens,
                "targets": TARGETS,
            },
        },
    )


if __name__ == "__main__":
    main()
