"""The fast fp8 paths (bit-moved e4m3 decode, aligned block views) equal the plain definitions."""

from __future__ import annotations

import torch

from weightsmith.checkpoint import fp8


def _plain_dequant(w, s, block):
    return w.float() * fp8._expand(s, tuple(w.shape), block)


def _plain_quant(w, block):
    bm, bn = block
    rows, cols = w.shape
    rb, cb = -(-rows // bm), -(-cols // bn)
    padded = torch.zeros(rb * bm, cb * bn)
    padded[:rows, :cols] = w.float()
    amax = padded.view(rb, bm, cb, bn).abs().amax(dim=(1, 3)).clamp_min(1e-4)
    s = amax / fp8.E4M3_MAX
    q = (padded.view(rb, bm, cb, bn) / s[:, None, :, None]).clamp_(-448, 448).to(torch.float8_e4m3fn)
    return q.view(rb * bm, cb * bn)[:rows, :cols].contiguous(), s


def test_e4m3_decode_by_bits_is_exact_for_every_code():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = codes[~codes.float().isnan()]
    assert torch.equal(fp8._e4m3_as_half(finite).float() * 256, finite.float())
    assert fp8._e4m3_as_half(codes) is None  # NaN codes present: caller falls back


def test_dequantize_equals_plain_definition():
    g = torch.Generator().manual_seed(0)
    for shape, block in [((256, 384), (128, 128)), ((300, 200), (128, 128)), ((64, 48), (16, 16))]:
        codes = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        codes[(codes & 0x7F) == 0x7F] = 0x12  # no NaN codes
        w = codes.view(torch.float8_e4m3fn)
        s = torch.rand(-(-shape[0] // block[0]), -(-shape[1] // block[1]), generator=g) * 1e-2 + 1e-6
        got = fp8.dequantize_blockwise(w, s, block)
        assert torch.equal(got, _plain_dequant(w, s, block)), shape
        assert torch.equal(
            fp8.dequantize_blockwise(w, s, block, torch.bfloat16), _plain_dequant(w, s, block).bfloat16()
        )
    nan = torch.tensor([[0x7F, 0x01], [0x02, 0x03]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert fp8.dequantize_blockwise(nan, torch.ones(1, 1), (128, 128))[0, 0].isnan()


def test_quantize_equals_plain_definition():
    g = torch.Generator().manual_seed(1)
    for shape in [(256, 384), (300, 200), (128, 7)]:
        w = torch.randn(shape, generator=g) * 0.02
        q, s = fp8.quantize_blockwise(w)
        rq, rs = _plain_quant(w, (128, 128))
        assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8)) and torch.equal(s, rs), shape
