"""`--dry-run` reads headers only and writes nothing: no output, no GGUF conversion, no cache entry."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_dry_run_from_gguf_writes_nothing(cli, tmp_path, monkeypatch):
    from weightsmith.assets import smollm2_gguf

    cache = tmp_path / "cache"
    monkeypatch.setenv("WEIGHTSMITH_CACHE", str(cache))
    r = cli("quant", smollm2_gguf(), tmp_path / "out", "--method", "rtn", "--dry-run", "--json")
    assert r.code == 0, r
    plan = json.loads(r.out)["plan"]
    # SmolLM2-135M: 30 layers x 7 projections, 4-bit codes of 134.5M parameters (tied embedding kept in fp32)
    assert plan["quantized_modules"] == 210 and 100e6 < plan["output_bytes"] < 200e6, plan
    assert not cache.exists() and not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
