"""The merge pass: selection is byte-exact (fp8 + scales), interpolation matches a float reference,
every safety check fires before anything is written, outputs load in transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from weightsmith.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise
from weightsmith.checkpoint.reader import Checkpoint

BLOCK = [16, 16]


def perturbed(src: Path, dst: Path, seed: int, scale: float = 0.5) -> Path:
    """A second parent: the same model with noise on every matrix (a 'fine-tune')."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        t = load_file(f)
        g = torch.Generator().manual_seed(seed)
        for k, v in t.items():
            if v.dim() == 2:
                t[k] = (v.float() + scale * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
        save_file(t, f, metadata={"format": "pt"})
    return dst


def to_fp8(src: Path, dst: Path, *, only_divisible: bool = False) -> Path:
    """DeepSeek-style fp8 copy: 2-D linear weights as e4m3 with block scale_inv (16x16 blocks here;
    `only_divisible`: only shapes the blocks divide, which is all transformers' CPU loader takes)."""
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    t = load_file(f)
    out = {}
    for k, v in t.items():
        if v.dim() == 2 and "proj" in k and not (only_divisible and (v.shape[0] % BLOCK[0] or v.shape[1] % BLOCK[1])):
            q, s = quantize_blockwise(v.float(), tuple(BLOCK))
            out[k], out[k + "_scale_inv"] = q, s
        else:
            out[k] = v.to(torch.bfloat16)
    save_file(out, f, metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": BLOCK,
        "activation_scheme": "dynamic",
    }
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture
def pair(tiny_model, tmp_path):
    a = tiny_model("llama")
    return a, perturbed(a, tmp_path / "b", 1)


@pytest.fixture
def fp8_pair(tiny_model, tmp_path):
    a = to_fp8(tiny_model("deepseek_v3"), tmp_path / "v3")
    b = to_fp8(perturbed(tiny_model("deepseek_v3"), tmp_path / "r1-bf", 2), tmp_path / "r1")
    return a, b


def _bytes(ck: Checkpoint, name: str) -> bytes:
    return bytes(ck.read_raw(name))


def test_selection_is_byte_exact(pair, cli, tmp_path):
    a, b = pair
    for k, parent in enumerate((a, b)):
        out = tmp_path / f"sel{k}"
        r = cli("merge", out, "--parent", a, "--parent", b, "--weights", f"parent:{k}")
        assert r.code == 0, r
        ck, src = Checkpoint(out), Checkpoint(parent)
        assert set(ck.names) == set(src.names)
        assert all(_bytes(ck, n) == _bytes(src, n) for n in src.names)


def test_chimera_rule_on_fp8_copies_weights_and_scales(fp8_pair, cli, tmp_path):
    v3, r1 = fp8_pair
    out = tmp_path / "chimera"
    r = cli(
        "merge",
        out,
        "--parent",
        v3,
        "--parent",
        r1,
        "--weights",
        "parent:0",
        "--rule",
        "group:routed_experts=parent:1",
        "--json",
    )
    assert r.code == 0, r
    ck, A, B = Checkpoint(out), Checkpoint(v3), Checkpoint(r1)
    experts = [n for n in A.names if ".mlp.experts." in n]
    assert experts and any(n.endswith("_scale_inv") for n in experts)
    for n in A.names:
        want = B if ".mlp.experts." in n else A
        assert _bytes(ck, n) == _bytes(want, n), n
    m = json.loads((out / "manifest.json").read_text())["metrics"]
    assert m["groups"]["routed_experts"]["selected"] == {"1": 4 * 3} and m["groups"]["attention"]["selected"] == {
        "0": 14
    }
    # weight 0 parents are never read: B contributed exactly its experts' bytes
    assert m["bytes_read_per_parent"][1] == sum(B.info(n).nbytes for n in experts)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["weight_block_size"] == BLOCK


def test_interpolation_matches_float_reference(pair, cli, tmp_path):
    a, b = pair
    out = tmp_path / "lin"
    assert cli("merge", out, "--parent", a, "--parent", b, "--weights", "0.3,0.7", "--workers", "2").code == 0
    ck, A, B = Checkpoint(out), Checkpoint(a), Checkpoint(b)
    for n in A.names:
        ref = 0.3 * A.get(n).float() + 0.7 * B.get(n).float()
        torch.testing.assert_close(ck.get(n).float(), ref, rtol=1e-6, atol=1e-7)
    # byte-identical twice (parallel workers do not change anything)
    out2 = tmp_path / "lin2"
    assert cli("merge", out2, "--parent", a, "--parent", b, "--weights", "0.3,0.7", "--workers", "1").code == 0
    for p in out.iterdir():
        assert p.read_bytes() == (out2 / p.name).read_bytes(), p.name
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(
        model.model.layers[0].mlp.up_proj.weight.float(), ck.get("model.layers.0.mlp.up_proj.weight").float()
    )


def test_fp8_interpolation_requantizes_blockwise(fp8_pair, cli, tmp_path):
    v3, r1 = fp8_pair
    out = tmp_path / "mix"
    assert cli("merge", out, "--parent", v3, "--parent", r1, "--weights", "0.5,0.5").code == 0
    ck, A, B = Checkpoint(out), Checkpoint(v3), Checkpoint(r1)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    deq = [dequantize_blockwise(c.get(name), c.get(name + "_scale_inv"), tuple(BLOCK)) for c in (A, B)]
    q, s = quantize_blockwise(0.5 * deq[0] + 0.5 * deq[1], tuple(BLOCK))
    assert ck.info(name).dtype == torch.float8_e4m3fn
    assert torch.equal(ck.get(name).view(torch.uint8), q.view(torch.uint8)) and torch.equal(
        ck.get(name + "_scale_inv"), s
    )
    # --out-dtype bf16: dequantized, scales gone, loads with plain from_pretrained
    bf = tmp_path / "bf16"
    assert cli("merge", bf, "--parent", v3, "--parent", r1, "--weights", "0.5,0.5", "--out-dtype", "bfloat16").code == 0
    ckb = Checkpoint(bf)
    assert not [n for n in ckb.names if n.endswith("_scale_inv")] and ckb.info(name).dtype == torch.bfloat16
    torch.testing.assert_close(ckb.get(name).float(), (0.5 * deq[0] + 0.5 * deq[1]).bfloat16().float())
    assert "quantization_config" not in json.loads((bf / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bf)
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_delta_copies_tensors_that_barely_differ(pair, cli, tmp_path, tiny_model):
    a, _ = pair
    near = perturbed(a, tmp_path / "near", 3, scale=1e-3)
    out = tmp_path / "d"
    assert cli("merge", out, "--parent", a, "--parent", near, "--weights", "0.5,0.5", "--delta", "0.01").code == 0
    m = json.loads((out / "manifest.json").read_text())["metrics"]["groups"]
    assert m["attention"]["copied_below_delta"] == 8 and m["attention"]["interpolated"] == 0
    ck, A = Checkpoint(out), Checkpoint(a)
    assert all(_bytes(ck, n) == _bytes(A, n) for n in A.names)
    out2 = tmp_path / "d2"  # a per-rule delta of 0 interpolates attention anyway
    assert (
        cli(
            "merge",
            out2,
            "--parent",
            a,
            "--parent",
            near,
            "--weights",
            "0.5,0.5",
            "--delta",
            "0.01",
            "--rule",
            "self_attn=0.5,0.5;delta=0",
        ).code
        == 0
    )
    m = json.loads((out2 / "manifest.json").read_text())["metrics"]["groups"]
    assert m["attention"]["interpolated"] == 8 and m["dense_mlp"]["copied_below_delta"] == 6


def test_output_sharded_like_the_base(tiny_model, cli, tmp_path):
    sharded = tmp_path / "sh"
    assert cli("import", tiny_model("llama"), sharded, "--max-shard-size", "100KB").code == 0
    b = perturbed(sharded, tmp_path / "shb", 4)
    shutil.rmtree(b / "manifest.json", ignore_errors=True) if (b / "manifest.json").is_dir() else (
        b / "manifest.json"
    ).unlink()
    out = tmp_path / "o"
    assert cli("merge", out, "--parent", sharded, "--parent", b).code == 0
    src_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    out_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert out_map == src_map and len(set(src_map.values())) > 1


def test_refusals_write_nothing(tiny_model, pair, cli, tmp_path):
    a, b = pair
    other = tiny_model("llama", hidden_size=32, intermediate_size=48, head_dim=8)
    cases = [
        (["--parent", a, "--parent", other], "different architecture: hidden_size"),
        (["--parent", a, "--parent", tiny_model("qwen2")], "model_type"),
        (["--parent", a, "--parent", b, "--rule", "experts=parent:1"], "matches no tensor"),
        (["--parent", a, "--parent", b, "--weights", "0.5,0.4"], "sum to 0.9"),
        (["--parent", a, "--parent", b, "--rule", "group:bogus=parent:1"], "unknown tensor group 'bogus'"),
        (["--parent", a, "--parent", b, "--weights", "parent:2"], "parent:2 but there are 2 parents"),
    ]
    for args, msg in cases:
        r = cli("merge", tmp_path / "x", *args)
        assert r.code != 0 and msg in r.err, (args, r)
        assert not (tmp_path / "x").exists()
    # a tensor missing from one parent
    c = tmp_path / "c"
    shutil.copytree(b, c)
    t = load_file(c / "model.safetensors")
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, c / "model.safetensors", metadata={"format": "pt"})
    r = cli("merge", tmp_path / "x", "--parent", a, "--parent", c)
    assert (
        r.code != 0
        and "model.layers.1.mlp.up_proj.weight" in r.err
        and "--partial" in r.err
        and not (tmp_path / "x").exists()
    )
    r = cli("merge", tmp_path / "y", "--parent", a, "--parent", c, "--partial", "base")
    assert r.code == 0 and _bytes(Checkpoint(tmp_path / "y"), "model.layers.1.mlp.up_proj.weight") == _bytes(
        Checkpoint(a), "model.layers.1.mlp.up_proj.weight"
    )
    # different tokenizers: refused until one is chosen
    tok = json.loads((b / "tokenizer.json").read_text())
    tok["added_tokens"] = tok.get("added_tokens", []) + [
        {
            "id": 255,
            "content": "<x>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    ]
    (b / "tokenizer.json").write_text(json.dumps(tok))
    r = cli("merge", tmp_path / "x", "--parent", a, "--parent", b)
    assert r.code != 0 and "tokenizer.json" in r.err and "--tokenizer-from" in r.err and not (tmp_path / "x").exists()
    r = cli("merge", tmp_path / "z", "--parent", a, "--parent", b, "--tokenizer-from", "1")
    assert r.code == 0 and (tmp_path / "z" / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_dry_run_and_recipe_file(pair, cli, tmp_path):
    a, b = pair
    recipe = tmp_path / "chimera.yaml"
    recipe.write_text(
        "weights: parent:0\nrule:\n  - {group: attention, weights: [0, 1]}\n  - 'mlp\\.down_proj=0.5,0.5'\n"
    )
    r = cli("merge", tmp_path / "o", "--parent", a, "--parent", b, "--recipe", recipe, "--dry-run", "--json")
    assert r.code == 0, r
    plan = json.loads(r.out)["plan"]
    assert (
        plan["groups"]["attention"]["rules"] == {"group:attention=0,1": 8}
        and plan["select"] == 21 - 2
        and plan["interpolate"] == 2
    )
    assert not (tmp_path / "o").exists()
    r = cli("merge", tmp_path / "o", "--parent", a, "--parent", b, "--recipe", recipe)
    assert r.code == 0, r
    ck, A, B = Checkpoint(tmp_path / "o"), Checkpoint(a), Checkpoint(b)
    assert _bytes(ck, "model.layers.0.self_attn.q_proj.weight") == _bytes(B, "model.layers.0.self_attn.q_proj.weight")
    assert _bytes(ck, "model.layers.0.mlp.up_proj.weight") == _bytes(A, "model.layers.0.mlp.up_proj.weight")
    torch.testing.assert_close(
        ck.get("model.layers.0.mlp.down_proj.weight"),
        0.5 * A.get("model.layers.0.mlp.down_proj.weight") + 0.5 * B.get("model.layers.0.mlp.down_proj.weight"),
    )


def test_fp8_strips_equal_whole_tensor(monkeypatch):
    from weightsmith.merge import maths

    g = torch.Generator().manual_seed(0)
    ws, ss = [], []
    for _ in range(2):
        q, s = quantize_blockwise(torch.randn(300, 200, generator=g), (128, 128))
        ws.append(q)
        ss.append(s)
    whole = maths.merge_fp8(ws, ss, [0.3, 0.7], (128, 128), requantize=True)
    monkeypatch.setattr(maths, "STRIP_ELEMENTS", 128 * 200)  # one block-row per strip
    strips = maths.merge_fp8(ws, ss, [0.3, 0.7], (128, 128), requantize=True)
    assert torch.equal(whole[0].view(torch.uint8), strips[0].view(torch.uint8)) and torch.equal(whole[1], strips[1])
    ref = quantize_blockwise(
        0.3 * dequantize_blockwise(ws[0], ss[0]) + 0.7 * dequantize_blockwise(ws[1], ss[1]), (128, 128)
    )
    assert torch.equal(whole[0].view(torch.uint8), ref[0].view(torch.uint8)) and torch.equal(whole[1], ref[1])


def test_parts_and_workers_do_not_change_the_output(pair, fp8_pair, cli, tmp_path, monkeypatch):
    """Tensors cut into many small parts (flat ranges, fp8 block-row strips, δ-gated tensors read
    part by part) give byte-identical outputs to whole-tensor parts, with 1 or 3 workers."""
    from weightsmith.merge import stream

    monkeypatch.setattr(stream, "REDUCE_ELEMS", 64)  # the δ gate's fixed grid; parts of 300 bytes then cut every tensor
    cases = [
        (pair, ["--weights", "0.3,0.7"]),
        (pair, ["--weights", "0.5,0.5", "--delta", "0.3"]),
        (fp8_pair, ["--weights", "0.5,0.5"]),
        (fp8_pair, ["--weights", "0.5,0.5", "--out-dtype", "bfloat16"]),
        (fp8_pair, ["--weights", "0.5,0.5", "--delta", "0.2"]),
    ]
    for i, ((a, b), args) in enumerate(cases):
        outs = []
        for part_bytes, workers in ((1 << 30, "1"), (300, "3")):
            monkeypatch.setattr(stream, "PART_BYTES", part_bytes)
            out = tmp_path / f"o{i}-{part_bytes}"
            r = cli("merge", out, "--parent", a, "--parent", b, "--workers", workers, *args)
            assert r.code == 0, r
            outs.append(out)
        names = sorted(p.name for p in outs[0].iterdir())
        assert names == sorted(p.name for p in outs[1].iterdir())
        for n in names:
            assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes(), (args, n)
    m = json.loads((outs[1] / "manifest.json").read_text())["metrics"]["groups"]
    assert sum(g["interpolated"] + g["copied_below_delta"] for g in m.values()) > 0


def test_parts_cover_tensors_exactly():
    from weightsmith.merge.stream import parts_of

    for shape, dtype, block in [
        ((1000,), torch.bfloat16, None),
        ((300, 200), torch.float8_e4m3fn, (128, 128)),
        ((7,), torch.float32, None),
        ((0,), torch.float32, None),
    ]:
        for pb in (1, 100, 4096, 1 << 30):
            ps = parts_of(shape, dtype, fp8_block=block, part_bytes=pb)
            esize = torch.empty((), dtype=dtype).element_size()
            total = esize * (shape[0] * (shape[1] if len(shape) > 1 else 1))
            assert ps[0].start == 0 and ps[-1].stop == total and all(p.stop == q.start for p, q in zip(ps, ps[1:]))
            if block:
                assert all(p.rows[0] % 128 == 0 for p in ps) and ps[-1].block_rows[1] == 3


def test_fp8_outputs_load_with_transformers_fp8_loader(tiny_model, cli, tmp_path):
    """transformers' fine-grained fp8 loader (on CPU it dequantizes to bf16) reads the Chimera and
    the requantized interpolation; what it holds equals our own dequantization of the output."""
    from transformers import AutoModelForCausalLM

    a = to_fp8(tiny_model("deepseek_v3"), tmp_path / "v3", only_divisible=True)
    b = to_fp8(perturbed(tiny_model("deepseek_v3"), tmp_path / "r1-bf", 5), tmp_path / "r1", only_divisible=True)
    name = "model.layers.1.mlp.experts.2.down_proj.weight"
    for label, args in (
        ("chimera", ["--weights", "parent:0", "--rule", "group:routed_experts=parent:1"]),
        ("mix", ["--weights", "0.5,0.5"]),
    ):
        out = tmp_path / label
        assert cli("merge", out, "--parent", a, "--parent", b, *args).code == 0
        ck = Checkpoint(out)
        assert ck.info(name).dtype == torch.float8_e4m3fn
        model = AutoModelForCausalLM.from_pretrained(out)
        sd = model.state_dict()
        mine = ck.get(name, dequantize=True, dtype=torch.bfloat16)
        theirs = [v for k, v in sd.items() if k == name] or [
            v[2] for k, v in sd.items() if k == "model.layers.1.mlp.experts.down_proj"
        ]
        assert theirs, sorted(sd)[:20]
        # transformers multiplies in bf16 (we in fp32, rounded once): equal up to a bf16 rounding or two
        torch.testing.assert_close(theirs[0].float(), mine.float(), rtol=2**-7, atol=1e-6)
        assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()


def test_three_parents_like_r1t2(tiny_model, cli, tmp_path):
    """Three parents: attention from the third, routed-free llama MLPs mixed three ways, the rest
    from the base; the dry run explains each group in words."""
    a = tiny_model("llama")
    b, c = perturbed(a, tmp_path / "b", 7), perturbed(a, tmp_path / "c", 8)
    args = [
        "--parent",
        a,
        "--parent",
        b,
        "--parent",
        c,
        "--weights",
        "parent:0",
        "--rule",
        "group:attention=parent:2",
        "--rule",
        "mlp=0.2,0.3,0.5",
    ]
    r = cli("merge", tmp_path / "o", *args, "--dry-run")
    assert (
        r.code == 0
        and "attention: 8 tensor(s) from parent 2 (bytes copied)" in r.err
        and "= 0.2·parent 0 + 0.3·parent 1 + 0.5·parent 2" in r.err
    ), r
    assert cli("merge", tmp_path / "o", *args).code == 0
    ck, A, B, C = Checkpoint(tmp_path / "o"), Checkpoint(a), Checkpoint(b), Checkpoint(c)
    for n in A.names:
        if ".self_attn." in n:
            assert _bytes(ck, n) == _bytes(C, n)
        elif ".mlp." in n:
            ref = 0.2 * A.get(n).float() + 0.3 * B.get(n).float() + 0.5 * C.get(n).float()
            torch.testing.assert_close(ck.get(n).float(), ref.to(A.info(n).dtype).float(), rtol=1e-6, atol=1e-7)
        else:
            assert _bytes(ck, n) == _bytes(A, n)
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())["metrics"]
    assert m["bytes_read_per_parent"][1] == sum(B.info(n).nbytes for n in B.names if ".mlp." in n)


def test_chimera_to_bf16_dequantizes_each_parent_with_its_own_scales(fp8_pair, cli, tmp_path):
    v3, r1 = fp8_pair
    out = tmp_path / "bf"
    r = cli(
        "merge",
        out,
        "--parent",
        v3,
        "--parent",
        r1,
        "--weights",
        "parent:0",
        "--rule",
        "group:routed_experts=parent:1",
        "--out-dtype",
        "bfloat16",
    )
    assert r.code == 0, r
    ck, A, B = Checkpoint(out), Checkpoint(v3), Checkpoint(r1)
    assert not [n for n in ck.names if n.endswith("_scale_inv")]
    for n in ck.names:
        src = B if ".mlp.experts." in n else A
        want = src.get(n, dequantize=src.info(n).dtype == torch.float8_e4m3fn, dtype=torch.bfloat16)
        assert torch.equal(ck.get(n), want), n
    m = json.loads((out / "manifest.json").read_text())["metrics"]["groups"]
    assert m["routed_experts"]["selected"] == {"1": 12} and m["attention"]["selected"] == {"0": 14}
