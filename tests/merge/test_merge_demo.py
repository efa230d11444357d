"""The merge demo step on the real SmolLM2: a byte-exact Chimera and a δ-gated 50/50 merge that
loads with plain transformers and sits between its parents in perplexity."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_demo_step_on_smollm2(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.app.demo import run_step
    from weightsmith.assets import hamlet
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows
    from weightsmith.merge.demo import demo_step

    lines = []
    row = demo_step(smollm2, tmp_path, lines.append, run_step)
    assert row["chimera_byte_exact"] is True
    # 30 layers x 7 matrices + embedding interpolated; every norm is identical in both parents: copied
    assert row["interpolated"] == 30 * 7 + 1 and row["copied_below_delta"] == 30 * 2 + 1, row
    tok = AutoTokenizer.from_pretrained(smollm2)
    wins = token_windows(tok, read_text(hamlet()), 128, 4, source="hamlet.txt")
    ppl = {
        k: perplexity(AutoModelForCausalLM.from_pretrained(p), wins)["perplexity"]
        for k, p in (("base", smollm2), ("sibling", tmp_path / "smollm2-noisy-sibling"), ("mix", row["path"]))
    }
    assert ppl["base"] < ppl["mix"] < ppl["sibling"], ppl
