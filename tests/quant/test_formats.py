"""Formats read back by independent readers: the GPTQ layout as published, and compressed-tensors."""

from __future__ import annotations

import json

import pytest
import torch

from weightsmith.checkpoint.reader import Checkpoint
from weightsmith.quant.formats import FORMATS, LinearQuant, QuantizedWeight
from weightsmith.quant.grid import GridSpec, rtn

MASKS = {2: 0x3, 3: 0x7, 4: 0xF, 8: 0xFF}


def published_unpack_rows(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack along dim 0 strictly as the GPTQ v1 layout is documented (not via weightsmith's packer).

    b in {2,4,8}: value r*pf+j sits at bits b*j of word r. b=3: per 3 words, values 0-9 at word0
    bits 3j; value 10 = word0 bits 30-31 | word1 bit 0 << 2; 11-20 at word1 bits 3j+1; value 21 =
    word1 bit 31 | word2 bits 0-1 << 1; 22-31 at word2 bits 3j+2.
    """
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(count, *w.shape[1:], dtype=torch.int64)
    if bits in (2, 4, 8):
        pf = 32 // bits
        for r in range(w.shape[0]):
            for j in range(pf):
                out[r * pf + j] = (w[r] >> (bits * j)) & MASKS[bits]
        return out
    for blk in range(count // 32):
        w0, w1, w2 = w[3 * blk], w[3 * blk + 1], w[3 * blk + 2]
        base = 32 * blk
        for j in range(10):
            out[base + j] = (w0 >> (3 * j)) & 7
        out[base + 10] = ((w0 >> 30) & 3) | ((w1 & 1) << 2)
        for j in range(10):
            out[base + 11 + j] = (w1 >> (3 * j + 1)) & 7
        out[base + 21] = ((w1 >> 31) & 1) | ((w2 & 3) << 1)
        for j in range(10):
            out[base + 22 + j] = (w2 >> (3 * j + 2)) & 7
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_layout_by_the_book(bits, sym):
    fmt = FORMATS["gptq"]
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    codes, scales, zeros, g_idx = rtn(w, GridSpec(bits, sym), 32)
    zeros = zeros.clamp(min=1)  # v1 cannot store zero 0 (the pass enforces this)
    qw = QuantizedWeight(codes, scales, zeros, g_idx, LinearQuant(bits, 32, sym))
    t = fmt.pack("m", qw, torch.float16)
    assert t["m.qweight"].shape == (128 * bits // 32, 64) and t["m.qzeros"].shape == (4, 64 * bits // 32)
    q = published_unpack_rows(t["m.qweight"], bits, 128).T  # [N, K]
    z = published_unpack_rows(t["m.qzeros"].T, bits, 64).T + 1  # stored zero - 1, packed along N
    assert torch.equal(q, codes.long()) and torch.equal(z, zeros.long())
    deq = t["m.scales"].float()[t["m.g_idx"].long()].T * (q - z[t["m.g_idx"].long()].T).float()
    assert torch.allclose(deq, qw.dequantize(), rtol=1e-3, atol=1e-3 * float(scales.max()))
    if sym:  # every stored zero field holds 2^(b-1) - 1
        fields = {2: 0x55555555, 4: 0x77777777, 8: 0x7F7F7F7F}
        if bits in fields:
            expect = fields[bits] - (1 << 32) if fields[bits] >= 1 << 31 else fields[bits]
            assert torch.all(t["m.qzeros"] == expect)
        else:
            assert torch.all(published_unpack_rows(t["m.qzeros"].T, 3, 64) == 3)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits,group", [(4, 32), (3, -1), (2, 32), (8, 64)])
def test_compressed_tensors_library_decompresses_our_output(tiny_model, cli, tmp_path, sym, bits, group):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import weightsmith

    out = tmp_path / "ct"
    args = [
        "quant",
        tiny_model("qwen2"),
        out,
        "--method",
        "rtn",
        "--format",
        "compressed-tensors",
        "--bits",
        str(bits),
        "--group-size",
        str(group),
    ]
    assert cli(*args, *([] if sym else ["--no-sym"])).code == 0
    ref = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(run_compressed=False)
    ).eval()
    ours = weightsmith.load(out)
    checked = 0
    for name, mod in ours.named_modules():
        if hasattr(mod, "dequantized_weight"):
            theirs = dict(ref.named_modules())[name].weight.float()
            assert torch.allclose(theirs, mod.dequantized_weight(torch.float32, "cpu"), atol=1e-6), name
            checked += 1
    assert checked == 14
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, ours(ids).logits, atol=1e-4)


def test_gptq_config_matches_what_vllm_expects(tiny_model, cli, tmp_path):
    out = tmp_path / "g"
    assert cli("quant", tiny_model("llama"), out, "--method", "rtn", "--group-size", "32", "--format", "gptq").code == 0
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: cfg[k] for k in ("quant_method", "checkpoint_format", "bits", "group_size", "sym", "desc_act")} == {
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "bits": 4,
        "group_size": 32,
        "sym": True,
        "desc_act": False,
    }
    ck = Checkpoint(out)
    for i in range(2):
        for proj in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ):
            p = f"model.layers.{i}.{proj}"
            assert f"{p}.weight" not in ck
            n, k = {
                "q": (64, 64),
                "k": (32, 64),
                "v": (32, 64),
                "o": (64, 64),
                "g": (96, 64),
                "u": (96, 64),
                "d": (64, 96),
            }[proj.split(".")[1][0]]
            assert ck.info(f"{p}.qweight").shape == (k // 8, n) and ck.info(f"{p}.qweight").dtype == torch.int32
            assert ck.info(f"{p}.qzeros").shape == (k // 32, n // 8) and ck.info(f"{p}.scales").shape == (k // 32, n)
            assert ck.info(f"{p}.scales").dtype == torch.float16 and ck.info(f"{p}.g_idx").shape == (k,)
    assert "lm_head.weight" in ck and ck.info("lm_head.weight").dtype == torch.float32


def test_default_output_loads_with_plain_from_pretrained(tiny_model, cli, tmp_path):
    """The default format: stock transformers + compressed-tensors read it with no options, mixed
    group sizes and skipped modules included, from a config.json of a few family patterns."""
    from transformers import AutoModelForCausalLM

    import weightsmith

    out = tmp_path / "ct"
    r = cli(
        "quant",
        tiny_model("llama"),
        out,
        "--method",
        "rtn",
        "--group-size",
        "64",
        "--override",
        r"layers\.1\.self_attn\.o_proj:skip",
    )
    assert r.code == 0, r
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    # 13 quantized modules of 2 layers: 5 families at g64, the down_proj family at g32 (96 % 64 != 0),
    # layer 0's o_proj by name (layer 1's is skipped)
    assert len(targets) == 7 and "re:^model\\.layers\\.0\\.self_attn\\.o_proj$" in targets, targets
    assert "re:^model\\.layers\\.1\\.self_attn\\.o_proj$" in qc["ignore"]
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    ours = weightsmith.load(out)
    assert isinstance(dict(stock.named_modules())["model.layers.1.self_attn.o_proj"], torch.nn.Linear)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, ours(ids).logits, atol=1e-4)
    assert torch.equal(
        stock.generate(ids, max_new_tokens=6, do_sample=False), ours.generate(ids, max_new_tokens=6, do_sample=False)
    )


def test_gptq_rotate_mse_output_reads_back_independently(tiny_model, cli, tmp_path, hamlet):
    """The best measured recipe (GPTQ --rotate --mse, 3 bits) written in both formats: compressed-tensors'
    own decompressor and the by-the-book GPTQ v1 unpacker give weightsmith.load's weights and logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import weightsmith

    src = tiny_model("llama", tie_word_embeddings=True)
    args = ["--bits", "3", "--group-size", "32", "--rotate", "--mse"]
    args += ["--calib", hamlet, "--calib-samples", "8", "--calib-length", "64"]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for fmt in ("compressed-tensors", "gptq"):
        out = tmp_path / fmt
        assert cli("quant", src, out, "--format", fmt, *args).code == 0
        ours = weightsmith.load(out)
        mods = {n: m for n, m in ours.named_modules() if hasattr(m, "dequantized_weight")}
        assert len(mods) == 14
        if fmt == "compressed-tensors":
            ref = AutoModelForCausalLM.from_pretrained(
                out, quantization_config=CompressedTensorsConfig(run_compressed=False)
            ).eval()
            theirs = {n: m.weight.float() for n, m in ref.named_modules() if n in mods}
            with torch.no_grad():
                assert torch.allclose(ref(ids).logits, ours(ids).logits, atol=1e-4)
        else:
            t = load_file(out / "model.safetensors")
            theirs = {}
            for n, m in mods.items():
                k = m.dequantized_weight(torch.float32, "cpu").shape[1]
                q = published_unpack_rows(t[n + ".qweight"], 3, k).T
                n_out = t[n + ".scales"].shape[1]
                z = published_unpack_rows(t[n + ".qzeros"].T, 3, n_out).T + 1
                g = t[n + ".g_idx"].long()
                theirs[n] = t[n + ".scales"].float()[g].T * (q - z[g].T).float()
        for n, m in mods.items():
            assert torch.allclose(theirs[n], m.dequantized_weight(torch.float32, "cpu"), atol=1e-6), (fmt, n)


def vllm_gptq_module_bits(qconfig: dict, name: str) -> int | None:
    """A GPTQ module's width as vLLM documents `dynamic`: rules in order, re.match on the module name,
    "-:" = not quantized, "+:" (or no sign) = override; no match = the top-level bits."""
    import re

    for key, over in (qconfig.get("dynamic") or {}).items():
        if key.startswith("-:"):
            if re.match(key[2:], name):
                return None
        elif re.match(key.removeprefix("+:"), name):
            return over.get("bits", qconfig["bits"])
    return qconfig["bits"]


def test_mixed_precision_output_reads_back_independently(tiny_model, cli, tmp_path, hamlet):
    """--avg-bits output with several widths, in both formats: compressed-tensors' own decompressor and
    the by-the-book GPTQ v1 unpacker (each module at the width vLLM's `dynamic` rules give it, fused
    qkv_proj / gate_up_proj included) reproduce weightsmith.load's weights and logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    import weightsmith

    src = tiny_model("llama")
    args = ["--avg-bits", "3", "--sensitivity", "layer", "--group-size", "32", "--calib", hamlet]
    args += ["--calib-samples", "8", "--calib-length", "64"]
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for fmt in ("compressed-tensors", "gptq"):
        out = tmp_path / fmt
        assert cli("quant", src, out, "--format", fmt, *args).code == 0
        chosen = {
            p: v["bits"]
            for p, v in json.loads((out / "manifest.json").read_text())["metrics"]["modules"].items()
            if "bits" in v
        }
        assert len(chosen) == 14 and len(set(chosen.values())) >= 2, chosen
        ours = weightsmith.load(out)
        mods = {n: m for n, m in ours.named_modules() if hasattr(m, "dequantized_weight")}
        assert {n: m.bits for n, m in mods.items()} == chosen
        if fmt == "compressed-tensors":
            ref = AutoModelForCausalLM.from_pretrained(
                out, quantization_config=CompressedTensorsConfig(run_compressed=False)
            ).eval()
            theirs = {n: m.weight.float() for n, m in ref.named_modules() if n in mods}
        else:
            qc = json.loads((out / "config.json").read_text())["quantization_config"]
            for i in range(2):  # vLLM's fused modules resolve to their shards' common width
                assert (
                    vllm_gptq_module_bits(qc, f"model.layers.{i}.self_attn.qkv_proj")
                    == chosen[f"model.layers.{i}.self_attn.q_proj"]
                )
                assert (
                    vllm_gptq_module_bits(qc, f"model.layers.{i}.mlp.gate_up_proj")
                    == chosen[f"model.layers.{i}.mlp.gate_proj"]
                )
            assert qc["bits"] not in (4, 8) or set(chosen.values()) <= {4, 8}  # vLLM must not pick Marlin
            t = load_file(out / "model.safetensors")
            theirs = {}
            for n, m in mods.items():
                b = vllm_gptq_module_bits(qc, n)
                assert b == chosen[n], n
                k = m.dequantized_weight(torch.float32, "cpu").shape[1]
                q = published_unpack_rows(t[n + ".qweight"], b, k).T
                n_out = t[n + ".scales"].shape[1]
                z = published_unpack_rows(t[n + ".qzeros"].T, b, n_out).T + 1
                g = t[n + ".g_idx"].long()
                theirs[n] = t[n + ".scales"].float()[g].T * (q - z[g].T).float()
            ref = AutoModelForCausalLM.from_pretrained(src).eval()  # the source model with their weights
            with torch.no_grad():
                for n, w in theirs.items():
                    dict(ref.named_modules())[n].weight.copy_(w)
        for n, m in mods.items():
            assert torch.allclose(theirs[n], m.dequantized_weight(torch.float32, "cpu"), atol=1e-6), (fmt, n)
        with torch.no_grad():
            assert torch.allclose(ref(ids).logits, ours(ids).logits, atol=1e-4), fmt
