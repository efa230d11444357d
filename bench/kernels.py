"""Low-bit GEMM speed on a GPU: weightsmith's CUDA and Triton kernels vs torch fp16 matmul.

    .venv/bin/python bench/kernels.py [--bits 4 3 2] [--ms 1 4 16 32 64 128] [--group 128]

For each layer shape (K x N) and batch M: median time (CUDA events, after warm-up), effective
GB/s (weight bytes incl. group scales + activations in/out), % of the GPU's peak memory bandwidth
(--peak-gbs, default read from a device-name table), and speedup over torch.matmul with fp16
weights. Writes bench/results/kernels-<gpu>.json and prints the table; docs/kernels.md keeps the
tables measured per GPU. Without a CUDA device it says so and exits 0 (nothing to measure).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, save  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]
PEAK_GBS = {
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "H200": 4800,
    "A100-SXM4-80GB": 2039,
    "A100-SXM4-40GB": 1555,
    "A10": 600,
    "L40S": 864,
    "RTX 4090": 1008,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128])
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--impls", nargs="+", default=["cuda", "triton"])
    ap.add_argument("--peak-gbs", type=float, default=None)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device here; the kernels' GPU timings need one (nothing measured).")
        return
    from weightsmith.kernels import cuda_ext, layout, ops

    name = torch.cuda.get_device_name(0)
    peak = args.peak_gbs or next((v for k, v in PEAK_GBS.items() if k in name), None)
    unavailable = {"cuda": cuda_ext.unavailable(), "triton": None}

    def timeit(fn) -> float:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.iters):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        return sorted(times)[len(times) // 2]

    rows = []
    gen = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        w16 = torch.randn(k, n, device="cuda", dtype=torch.float16) / k**0.5
        for bits in args.bits:
            q = torch.randint(0, 2**bits, (n, k), dtype=torch.int32, generator=gen)
            planes = layout.repack_codes(q, bits)
            g = k // args.group
            kw = layout.KernelWeight(
                [p.cuda() for p in planes],
                (torch.rand(g, n, generator=gen) * 0.01).half().cuda(),
                None,
                bits,
                args.group,
                k,
                n,
            )
            wbytes = kw.nbytes()
            for m in args.ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.float16)
                t16 = timeit(lambda: x @ w16)
                for impl in args.impls:
                    if unavailable.get(impl):
                        rows.append(
                            {"K x N": f"{k}x{n}", "bits": bits, "M": m, "impl": impl, "note": unavailable[impl]}
                        )
                        continue
                    op = ops.gemm_cuda if impl == "cuda" else ops.gemm_triton
                    t = timeit(lambda: ops.call(op, x, kw))
                    moved = wbytes + 2 * m * (k + n)
                    rows.append(
                        {
                            "K x N": f"{k}x{n}",
                            "bits": bits,
                            "M": m,
                            "impl": impl,
                            "us": t * 1e6,
                            "GB/s": moved / t / 1e9,
                            "% peak BW": (moved / t / 1e9 / peak * 100) if peak else None,
                            "fp16 us": t16 * 1e6,
                            "speedup vs fp16": t16 / t,
                        }
                    )
                print(rows[-1], flush=True)
    print_table(
        rows,
        ["K x N", "bits", "M", "impl", "us", "GB/s", "% peak BW", "fp16 us", "speedup vs fp16", "note"],
        f"{name}, group {args.group}, fp16 activations",
    )
    save(f"kernels-{name.replace(' ', '_')}", {"gpu": name, "peak_gbs": peak, "rows": rows})


if __name__ == "__main__":
    main()
