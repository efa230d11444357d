"""Runs under torchrun (2 processes, gloo) against the same runs in one process.

- GPTQ (plain, GPTAQ's full-precision target on a MoE model) and RTN quant, and merge, at world
  size 2: RTN and merge are bit-exact with world size 1; GPTQ agrees to fp tolerance (its Hessians
  are summed in another order); a second world-size-2 run writes the same bytes; the manifest
  records the world size; a world-size-2 rerun onto a world-size-1 output finds it up to date.
- A rank that raises, or is SIGKILLed, mid-run: no output that looks complete, every rank exits
  non-zero, and the error names the failing rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CAL = ["--calib-samples", "8", "--calib-length", "64"]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(args: list[str], *, timeout: int = 240, **env) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        *args,
    ]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_one(argv: list[str]) -> None:
    from weightsmith.app.cli import main

    assert main(argv) == 0, argv


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _logits(path: Path) -> torch.Tensor:
    import weightsmith

    model = weightsmith.load(path)
    ids = torch.arange(2, 66).reshape(2, 32)
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, hamlet):
    """One world-size-1 run of each job in this process and one torchrun launch for all world-size-2 runs."""
    tmp = tmp_path_factory.mktemp("dist")
    dense = tiny_model("llama")
    other = tiny_model("llama", seed=1)
    moe = tiny_model("qwen3_moe")
    gptq = ["--method", "gptq", "--calib", str(hamlet), *CAL, "--group-size", "32"]
    jobs = {
        "gptq": ["quant", str(dense), None, *gptq],
        "gptaq": ["quant", str(moe), None, *gptq, "--fp-target", "--act-order", "group", "--min-expert-tokens", "8"],
        "rtn": ["quant", str(dense), None, "--method", "rtn", "--group-size", "32"],
        "merge": ["merge", None, "--parent", str(dense), "--parent", str(other), "--weights", "0.3,0.7"],
    }

    def argv(job: str, out: Path) -> list[str]:
        return [str(out) if a is None else a for a in jobs[job]]

    for job in jobs:
        run_one(argv(job, tmp / f"{job}-1"))
    two = [argv(job, tmp / f"{job}-2") for job in jobs]
    two.append(argv("gptq", tmp / "gptq-2b"))  # same world size again: same bytes
    two.append(argv("gptq", tmp / "gptq-1"))  # the world-size-1 output is up to date at world size 2
    (tmp / "jobs.json").write_text(json.dumps(two))
    mtime = (tmp / "gptq-1" / "manifest.json").stat().st_mtime_ns
    status = tmp / "status"
    status.mkdir()
    res = torchrun([str(ROOT / "tests" / "dist_jobs.py"), str(tmp / "jobs.json"), str(status)])
    assert res.returncode == 0, res.stderr[-3000:]
    for r in (0, 1):
        assert json.loads((status / f"rank-{r}.json").read_text()) == [0] * len(two)
    assert (tmp / "gptq-1" / "manifest.json").stat().st_mtime_ns == mtime
    return tmp


def test_manifest_records_the_world_size(runs):
    for job in ("gptq", "rtn", "merge"):
        assert manifest(runs / f"{job}-1")["environment"]["world_size"] == 1
        assert manifest(runs / f"{job}-2")["environment"]["world_size"] == 2


@pytest.mark.parametrize("job", ["rtn", "merge"])
def test_bit_exact_across_world_sizes(runs, job):
    one, two = files(runs / f"{job}-1"), files(runs / f"{job}-2")
    assert one.keys() == two.keys()
    for name in one:
        if name != "manifest.json":
            assert one[name] == two[name], name
    m1, m2 = manifest(runs / f"{job}-1"), manifest(runs / f"{job}-2")
    for m in (m1, m2):
        m.pop("manifest_sha256", None)
        m["environment"].pop("world_size")
        # provenance of the checkout at each run's start: a commit between the two runs changes it
        m.get("tool", {}).pop("git_sha", None)
    assert m1 == m2
    if job == "merge":  # and it loads with plain transformers
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(runs / "merge-2")
        assert model.config.num_hidden_layers == 2


def test_same_world_size_reruns_are_byte_identical(runs):
    assert files(runs / "gptq-2") == files(runs / "gptq-2b")


def _mean_error(out: Path) -> float:
    errs = [v["rel_output_error"] for v in manifest(out)["metrics"]["modules"].values() if "rel_output_error" in v]
    return sum(errs) / len(errs)


def test_gptq_agrees_with_one_process(runs, tiny_model):
    from safetensors.torch import load_file

    one, two = runs / "gptq-1", runs / "gptq-2"
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if a[name].dtype == torch.int32:  # packed codes: at most a few round the other way
            differ = (a[name] != b[name]).float().mean().item()
            assert differ <= 0.02, (name, differ)
        else:
            torch.testing.assert_close(a[name].float(), b[name].float(), rtol=1e-3, atol=1e-5)
    la, lb = _logits(one), _logits(two)
    assert (la - lb).abs().max().item() <= 1e-3 * la.abs().max().item()
    assert _mean_error(two) == pytest.approx(_mean_error(one), rel=1e-4)


def test_gptaq_on_moe_agrees_as_well_as_the_method_allows(runs, tiny_model):
    """GPTAQ's target takes X̃ᵀX − XᵀX, a difference of two nearly equal sums: summing them in
    another order (two ranks, or another --batch-size in one process) moves codes on a tiny model.
    World size 2 must stay closer to world size 1 than quantization is to the source model, with
    the same mean output error to 2%, and the experts' token counts summed over ranks."""
    one, two = runs / "gptaq-1", runs / "gptaq-2"
    la, lb, src = _logits(one), _logits(two), _logits(tiny_model("qwen3_moe"))
    assert (la - lb).abs().max().item() < (la - src).abs().max().item()
    assert _mean_error(two) == pytest.approx(_mean_error(one), rel=0.02)
    m1, m2 = manifest(one)["metrics"]["modules"], manifest(two)["metrics"]["modules"]
    experts = [k for k in m1 if k.endswith("<experts>")]
    assert experts and all(m1[k]["tokens_per_expert"] == m2[k]["tokens_per_expert"] for k in experts)


def _no_complete_output(out: Path) -> None:
    assert not out.exists()
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not any(".tmp-" in n and (out.parent / n / "manifest.json").exists() for n in left), left


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_fails_every_rank(tmp_path, tiny_model, hamlet, how):
    src = tiny_model("llama", layers=3)
    out = tmp_path / "out"
    spec = "1:1" if how == "raise" else "1:1:kill"
    args = ["-m", "weightsmith", "quant", str(src), str(out), "--method", "gptq", "--calib", str(hamlet), *CAL]
    res = torchrun(args, WEIGHTSMITH_TEST_FAIL=spec)
    assert res.returncode != 0
    _no_complete_output(out)
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
    if how == "raise":
        # both ranks exit with the failing rank's one line
        assert len([e for e in errors if "rank 1 failed: layer 1: failure injected" in e]) == 2, res.stderr[-3000:]
    else:
        # rank 1 died without a word: rank 0 says so, and the launcher's log names rank 1 as the root cause
        assert any("rank 0: a peer process stopped without leaving a message" in e for e in errors), res.stderr[-3000:]
        root = res.stderr[res.stderr.index("Root Cause") :]
        assert "rank      : 1" in root and "-9" in root, root
    # the next run (one process) finds nothing in its way and cleans up what the failed one left
    run_one(["quant", str(src), str(out), "--method", "rtn"])
    assert (out / "manifest.json").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.") and "lock" not in p.name]
