"""distill under torchrun (2 processes, gloo): FSDP (`--fsdp student|both`), resume across world sizes.

One launch runs every world-size-2 job (tests/dist_pass_jobs.py); the world-size-1 runs are made in
this process. Checked:
- `--fsdp student` (and `--fsdp both` on a student with tied embeddings) agrees with one process to
  fp tolerance (gradients are averaged over the ranks in another order), and each rank holds half of
  the student's parameter elements;
- an FSDP run interrupted at step 3 (state saved at step 2) and resumed writes the bytes of the
  uninterrupted FSDP run; `accelerate launch --use_fsdp`'s environment (ACCELERATE_USE_FSDP=true,
  FSDP_CPU_RAM_EFFICIENT_LOADING=true) means `--fsdp student` (the same bytes: the teacher, loaded on
  every rank, gets its real weights everywhere);
- the saved state does not depend on the world size or the sharding: a DDP run interrupted at world
  size 2 and resumed in one process, and a one-process run interrupted and resumed under FSDP at
  world size 2, both finish, from the saved step, within the same tolerance of the one-process run.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
from pathlib import Path

import pytest

from dist_pass_jobs import interrupted
from test_distributed import files, manifest, run_one, torchrun
from test_distributed_passes import _agree, _tensors

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, hamlet):
    from weightsmith.app.cli import main

    tmp = tmp_path_factory.mktemp("distd")
    teacher = str(tiny_model("llama", layers=3))
    students = {  # 95 MLP rows: split 48 / 47, so the padded scatter and gather of uneven shards run
        "plain": str(tiny_model("llama", seed=1, intermediate_size=95)),
        "tied": str(tiny_model("llama", seed=2, tie_word_embeddings=True)),
    }
    opts = ["--calib", str(hamlet), "--tokens", "1024", "--calib-length", "64", "--batch-size", "4", "--lr", "1e-3",
            "--save-every", "2"]  # fmt: skip

    def argv(out: str, student: str = "plain", *extra: str) -> list[str]:
        return ["distill", students[student], teacher, str(tmp / out), *opts, *extra]

    run_one(argv("one"))
    run_one(argv("tied-one", "tied"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(argv("one-fsdp", "plain", "--fsdp", "student")) == 0
    assert "note: --fsdp student in one process: nothing to shard, trained unsharded" in err.getvalue()
    with interrupted(["distilling", 3]):  # one process, stopped after step 3 (state saved at step 2)
        assert main(argv("one-to-two")) != 0
    assert (tmp / ".one-to-two.distill-state" / "state.pt").is_file()
    two = [
        {"argv": argv("fsdp", "plain", "--fsdp", "student")},
        {"argv": argv("fsdp-r", "plain", "--fsdp", "student"), "interrupt": ["distilling", 3]},
        {"argv": argv("fsdp-r", "plain", "--fsdp", "student")},  # resumes at step 2
        # what `accelerate launch --use_fsdp` sets (transformers then loads zeros on ranks > 0 unless told not to)
        {"argv": argv("fsdp-env"), "env": {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}},
        {"argv": argv("tied-both", "tied", "--fsdp", "both")},
        {"argv": argv("two-to-one"), "interrupt": ["distilling", 3]},  # DDP, resumed below in one process
        {"argv": argv("one-to-two", "plain", "--fsdp", "student")},  # resumes the one-process state under FSDP
    ]
    (tmp / "jobs.json").write_text(json.dumps(two))
    (tmp / "status").mkdir()
    res = torchrun([str(ROOT / "tests" / "dist_pass_jobs.py"), str(tmp / "jobs.json"), str(tmp / "status")])
    assert res.returncode == 0, res.stderr[-3000:]
    for r in (0, 1):
        codes = json.loads((tmp / "status" / f"rank-{r}.json").read_text())
        assert [c != 0 for c in codes] == [False, True, False, False, False, True, False], (codes, res.stderr[-3000:])
    # two resumed runs; every rank prints the notes
    assert res.stderr.count("note: resumed from the saved training state at step 2/4") == 4, res.stderr[-3000:]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):  # the notes go to stderr
        assert main(argv("two-to-one")) == 0  # the world-size-2 DDP state, resumed in one process
    assert "note: resumed from the saved training state at step 2/4" in err.getvalue(), err.getvalue()[-3000:]
    return tmp, res.stderr


# worst relative tensor difference measured against one process (largest |Δ| / largest |w| per tensor):
# --fsdp student 4.1e-7, --fsdp both (tied embeddings) 4.5e-7, DDP stopped at world size 2 and resumed in
# one process 4.1e-7, one process resumed under FSDP 1.2e-7 (logits: at most 4.2e-7); the bound is ~10x.
# (An earlier student, 96 MLP rows and seed 1, gave 3.6e-5 for FSDP and DDP alike: Adam's first steps
# amplify last-bit differences of tiny gradients, so the bound is per model.)
REL = 5e-6


@pytest.mark.parametrize("out, one", [("fsdp", "one"), ("tied-both", "tied-one"), ("two-to-one", "one"),
                                      ("one-to-two", "one")])  # fmt: skip
def test_fsdp_and_cross_world_size_resume_agree_with_one_process(runs, out, one):
    tmp, _ = runs
    _agree(tmp / one, tmp / out, REL)
    m1, m2 = manifest(tmp / one)["metrics"], manifest(tmp / out)["metrics"]
    # the manifest rounds the KL to 6 decimals (~5e-5 of these values): measured up to 5.2e-5 apart
    assert m1["steps"] == m2["steps"] and m2["kl_per_step"] == pytest.approx(m1["kl_per_step"], rel=1e-4)
    assert not (tmp / f".{out}.distill-state").exists()


def test_fsdp_shards_the_student_over_the_ranks(runs):
    tmp, log = runs
    held = re.findall(r"FSDP \((student|both)\) over 2 ranks: the ranks hold ([\d,]+) / ([\d,]+) of the ([\d,]+)", log)
    assert len(held) == 6, log[-3000:]  # fsdp, fsdp-r twice, fsdp-env, tied-both, one-to-two (rank 0 logs)
    for _, a, b, total in held:
        a, b, total = (int(x.replace(",", "")) for x in (a, b, total))
        assert a + b == total and abs(a - b) <= total // 50  # rows split evenly, up to one row per tensor


def test_fsdp_in_one_process_is_the_unsharded_run(runs):
    tmp, _ = runs
    a, b = _tensors(tmp / "one"), _tensors(tmp / "one-fsdp")
    assert all(a[k].equal(b[k]) for k in a)


def test_fsdp_refuses_fp16():
    from weightsmith.errors import UsageError
    from weightsmith.prune.distill import DistillConfig

    with pytest.raises(UsageError, match="--mixed-precision fp16 with --fsdp"):
        DistillConfig(fsdp="student", mixed_precision="fp16")


def test_fsdp_interrupted_resumes_to_the_same_bytes(runs):
    tmp, _ = runs
    assert files(tmp / "fsdp") == files(tmp / "fsdp-r")
    assert not (tmp / ".fsdp-r.distill-state").exists()


def test_accelerate_use_fsdp_means_fsdp_student(runs):
    tmp, _ = runs
    a, b = _tensors(tmp / "fsdp"), _tensors(tmp / "fsdp-env")
    assert all(a[k].equal(b[k]) for k in a)


def test_slurm_example_is_valid_bash():
    script = ROOT / "docs" / "examples" / "slurm-distributed.sbatch"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
