"""Lean import, fp8 maths, eval maths, sizes."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from weightsmith.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise
from weightsmith.util import parse_size


def test_import_is_lean():
    code = (
        "import sys, weightsmith; bad=[m for m in ('torch','transformers') if m in sys.modules]; print(bad); "
        "sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("shape", [(128, 128), (300, 200), (7, 5), (256, 384)])
def test_fp8_quant_roundtrip(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(*shape, generator=g) * 3
    q, s = quantize_blockwise(w)
    assert s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    d = dequantize_blockwise(q, s)
    # per block, the max maps exactly to 448 and relative error is bounded by e4m3's half-ulp (2^-4)
    rel = ((d - w).abs() / w.abs().clamp_min(1e-3)).median()
    assert rel < 0.04
    q2, s2 = quantize_blockwise(d)  # requantizing dequantized weights is exact
    assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)) and torch.allclose(s2, s)


def test_perplexity_matches_manual(tiny_model):
    from transformers import AutoModelForCausalLM

    from weightsmith.eval.perplexity import divergence, perplexity

    m = AutoModelForCausalLM.from_pretrained(tiny_model("llama")).eval()
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    res = perplexity(m, ids, batch_size=2)
    with torch.no_grad():
        logits = m(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert math.isclose(res["perplexity"], math.exp(float(nll)), rel_tol=1e-5)
    m2 = AutoModelForCausalLM.from_pretrained(tiny_model("llama")).eval()
    with torch.no_grad():
        m2.lm_head.weight.add_(torch.randn_like(m2.lm_head.weight) * 0.5)
    d = divergence(m, m2, ids)
    assert d["mean_kl"] > 1e-3 and d["max_abs_logit_diff"] > 0 and d["top1_agreement"] < 1


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200MB") == 200 * 10**6 and parse_size("1GiB") == 2**30
    with pytest.raises(ValueError):
        parse_size("lots")
