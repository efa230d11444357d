"""Minitron search: candidates within the budget, ranked by KL, the best one written and loadable."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM


def test_search_writes_the_best_candidate_within_budget(tiny_model, cli, tmp_path, hamlet):
    src = tiny_model("llama", layers=5)
    out = tmp_path / "m"
    r = cli(
        "minitron",
        src,
        out,
        "--params",
        "0.7",
        "--calib",
        hamlet,
        "--calib-samples",
        "12",
        "--calib-length",
        "64",
        "--score-windows",
        "4",
    )
    assert r.code == 0, r
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    kls = [c["kl"] for c in m["candidates"]]
    assert len(kls) >= 2 and kls == sorted(kls)  # ranked
    assert all(0.95 * m["budget"] <= c["params"] <= m["budget"] for c in m["candidates"])
    assert m["chosen"] == m["candidates"][0]["candidate"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == m["params_after"] <= m["budget"]
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, do_sample=False).shape == (1, 4)


def test_search_by_loss_with_a_distillation_round(tiny_model, cli, tmp_path, hamlet):
    src = tiny_model("qwen2", layers=4)
    out = tmp_path / "m"
    r = cli(
        "minitron",
        src,
        out,
        "--params",
        "0.75",
        "--rank-by",
        "loss",
        "--candidates",
        "3",
        "--top-k",
        "1",
        "--distill-tokens",
        "512",
        "--lr",
        "1e-3",
        "--calib",
        hamlet,
        "--calib-samples",
        "10",
        "--calib-length",
        "64",
        "--score-windows",
        "2",
    )
    assert r.code == 0, r
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    losses = [c["loss"] for c in m["candidates"]]
    assert m["rank_by"] == "loss" and losses == sorted(losses) and m["source_loss"] > 0
    top = m["candidates"][:1]
    assert (
        len(m["candidates"]) >= 2 and "loss_after_distill" in top[0] and "loss_after_distill" not in m["candidates"][-1]
    )
    best = min(top, key=lambda c: min(c["loss"], c["loss_after_distill"]))
    assert m["chosen"] == best["candidate"]
    assert "candidates ranked by loss" in r.err
    AutoModelForCausalLM.from_pretrained(out)


def test_search_refuses_unreachable_budgets_and_moe(tiny_model, cli, tmp_path):
    r = cli("minitron", tiny_model("llama"), tmp_path / "x", "--params", "0.1")
    assert r.code == 2 and "relax them or raise --params" in r.err
    r = cli("minitron", tiny_model("mixtral"), tmp_path / "x", "--params", "0.8")
    assert r.code == 2 and "dense families" in r.err


def test_search_keeps_gemma3_hidden_size(tiny_model, cli, tmp_path, hamlet):
    out = tmp_path / "m"
    r = cli(
        "minitron",
        tiny_model("gemma3_text", layers=6),
        out,
        "--params",
        "0.85",
        "--calib",
        hamlet,
        "--calib-samples",
        "4",
        "--calib-length",
        "64",
        "--score-windows",
        "2",
    )
    assert r.code == 0, r
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["candidates"] and all("hidden 64," in c["candidate"] for c in m["candidates"])
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
