"""Memory of `distill` per rank on SmolLM2-135M: one process, DDP and FSDP (--fsdp student|both) at world size 2.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distributed_fsdp.py [--tokens 768] [--calib-length 128] [--batch-size 2]

Each job runs the CLI once per rank (world size 2 under `python -m torch.distributed.run
--nproc-per-node 2`, gloo); every rank reports its peak RSS over the whole run (ru_maxrss: includes
loading, where rank 0 holds the whole model before sharding it) and the largest RSS it had after an
optimizer step (VmRSS, the training phase), and rank 0's log gives the student parameter elements each
rank holds (FSDP: its rows; otherwise the whole student). Every rank runs with
MALLOC_MMAP_THRESHOLD_=1 MiB (--malloc-mmap-threshold): with glibc's default, the tensors freed
after FSDP's all-gathers stay in the heap and RSS climbs step after step (rank 1 of --fsdp both:
3.8 GB after 2 steps; with the threshold 2.0 GB after 3 steps, flat from step 2: measured with a
probe of this run), so RSS would not show what is live. The student is SmolLM2 itself and so is
the teacher (the KL starts at 0: this measures memory, not healing). The machine has 2 CPU cores shared
with other jobs; wall times are upper bounds and not the point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, provenance, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(argv: list[str], out_dir: Path) -> int:
    import resource

    from weightsmith import dist
    from weightsmith.app.cli import main as cli_main
    from weightsmith.prune import distill

    after_step: list[float] = []
    step = distill.KDTrainer.step

    def measured(self, batch):
        out = step(self, batch)
        after_step.append(_rss_mb())
        return out

    distill.KDTrainer.step = measured
    t0 = time.perf_counter()
    rc = cli_main(argv)
    w = dist.world()
    report = {
        "rank": w.rank,
        "rc": rc,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_rss_mb": max(after_step) if after_step else None,
    }
    (out_dir / f"rank-{w.rank}.json").write_text(json.dumps(report))
    return rc


def launch(argv: list[str], size: int, out_dir: Path, mmap_threshold: int = 0) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    me = [str(Path(__file__).resolve()), "--worker", json.dumps(argv), str(out_dir)]
    cmd = [sys.executable, *me] if size == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(size),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", *me,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if mmap_threshold:  # glibc: allocations from this size up are mmapped, so freed tensors leave RSS
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed at world size {size}: weightsmith {' '.join(argv)}\n{r.stderr[-3000:]}")
    ranks = [json.loads((out_dir / f"rank-{k}.json").read_text()) for k in range(size)]
    held = re.search(r"the ranks hold ([\d, /]+) of the ([\d,]+) student parameter elements", r.stderr)
    return {
        "wall_seconds": wall,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "ranks": ranks,
        "student_elements_per_rank": [int(x.replace(",", "")) for x in held.group(1).split(" / ")] if held else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=2, metavar=("ARGV_JSON", "OUT_DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--calib-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=1 << 20,
        help="MALLOC_MMAP_THRESHOLD_ for every rank (0: glibc's default, under which freed heap stays in RSS)",
    )
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench-fsdp")
    args = ap.parse_args()
    if args.worker:
        sys.exit(worker(json.loads(args.worker[0]), Path(args.worker[1])))

    from quant import smollm2  # noqa: E402  (bench/quant.py: the imported SmolLM2 checkpoint)
    from weightsmith.assets import hamlet
    from weightsmith.checkpoint.reader import Checkpoint

    scratch = Path(args.scratch)
    src = smollm2(scratch)
    n = sum(math.prod(i.shape) for i in Checkpoint(src).infos())
    opts = ["--calib", str(hamlet()), "--tokens", str(args.tokens), "--calib-length", str(args.calib_length),
            "--batch-size", str(args.batch_size), "--save-every", "0"]  # fmt: skip
    jobs = [("one process", 1, []), ("DDP", 2, []), ("--fsdp student", 2, ["--fsdp", "student"]),
            ("--fsdp both", 2, ["--fsdp", "both"])]  # fmt: skip
    rows, results = [], []
    for name, size, extra in jobs:
        out = scratch / f"out-{len(results)}"
        res = launch(
            ["distill", str(src), str(src), str(out), *opts, *extra, "--force"],
            size,
            scratch / f"ranks-{len(results)}",
            args.malloc_mmap_threshold,
        )
        held = res["student_elements_per_rank"] or [n] * size
        res.update(job=name, world_size=size, student_elements=n, malloc_mmap_threshold=args.malloc_mmap_threshold)
        results.append(res)
        rows.append(
            {
                "run": name,
                "world size": size,
                "student elements per rank": " / ".join(f"{h / 1e6:.1f} M" for h in held),
                "params+grads+AdamW MB per rank (4 x elements x 4 B)": " / ".join(
                    f"{16 * h / 2**20:.0f}" for h in held
                ),
                "peak RSS MB per rank": " / ".join(f"{r['peak_rss_mb']:.0f}" for r in res["ranks"]),
                "RSS after a step MB per rank": " / ".join(f"{r['train_rss_mb']:.0f}" for r in res["ranks"]),
                "wall s": round(res["wall_seconds"]),
            }
        )
    print_table(rows, list(rows[0]), title="distill on SmolLM2-135M: memory per rank")
    save("distributed_fsdp", {**provenance(), "args": vars(args), "results": results, "table": rows})


if __name__ == "__main__":
    main()
