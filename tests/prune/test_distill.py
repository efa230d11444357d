"""Distillation: lowers the student's divergence from its teacher, resumes bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch

import weightsmith
from weightsmith.eval.perplexity import divergence
from weightsmith.progress import Reporter


@pytest.fixture
def student(tiny_model, cli, tmp_path, hamlet):
    out = tmp_path / "student"
    assert (
        cli(
            "prune",
            tiny_model("llama"),
            out,
            "--ffn",
            "48",
            "--heads",
            "2",
            "--refit",
            "none",
            "--calib",
            hamlet,
            "--calib-samples",
            "4",
            "--calib-length",
            "64",
        ).code
        == 0
    )
    return out


def _kl(teacher, path, hamlet):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    ids = torch.tensor(tok(hamlet.read_text()[-6000:])["input_ids"][: 4 * 128]).view(4, 128)
    return divergence(weightsmith.load(teacher), weightsmith.load(path), ids)["mean_kl"]


def _interrupting_track(after: int):
    """A Reporter.track that raises KeyboardInterrupt, as Ctrl-C would, once `after` items are done."""

    def track(self, items, *, total=None, desc=""):
        for k, x in enumerate(items):
            if k == after:
                raise KeyboardInterrupt
            yield x

    return track


ARGS = ["--tokens", "4096", "--calib-length", "128", "--batch-size", "4", "--lr", "1e-3", "--save-every", "2"]


def test_distill_lowers_divergence_and_resumes_exactly(student, tiny_model, cli, tmp_path, hamlet, monkeypatch):
    teacher = tiny_model("llama")
    out = tmp_path / "d"
    r = cli("distill", student, teacher, out, "--calib", hamlet, *ARGS)
    assert r.code == 0, r
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"]["steps"] == 8 and m["metrics"]["kl_last_steps"] < m["metrics"]["kl_first_steps"]
    assert "tokens/s" in r.err
    assert _kl(teacher, out, hamlet) < 0.8 * _kl(teacher, student, hamlet)
    assert [s["pass"]["name"] for s in m["chain"]] == ["prune"]
    # interrupted after step 5 (state saved at step 4), then resumed: the same bytes
    out2 = tmp_path / "d2"
    with (
        monkeypatch.context() as mp
    ):  # Ctrl-C as the sixth step is about to start (the loop steps through Reporter.track)
        mp.setattr(Reporter, "track", _interrupting_track(after=5))
        r = cli("distill", student, teacher, out2, "--calib", hamlet, *ARGS)
    assert r.code == 130 and not out2.exists() and (tmp_path / ".d2.distill-state" / "state.pt").exists()
    r = cli("distill", student, teacher, out2, "--calib", hamlet, *ARGS)
    assert r.code == 0 and "resumed from the saved training state at step 4/8" in r.err
    assert not (tmp_path / ".d2.distill-state").exists()
    for p in out.iterdir():
        if p.name != "manifest.json":
            assert p.read_bytes() == (out2 / p.name).read_bytes(), p.name


def test_distill_refuses_other_vocabularies(student, tiny_model, cli, tmp_path, hamlet):
    other = tiny_model("llama", vocab=300)
    r = cli("distill", student, other, tmp_path / "x", "--calib", hamlet, *ARGS)
    assert r.code == 1 and "vocabulary" in r.err and not (tmp_path / "x").exists()
