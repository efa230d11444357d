"""Layer-wise engine: equals a full forward pass on every family; hooks see the same statistics."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from weightsmith.checkpoint.reader import Checkpoint
from weightsmith.engine import LayerwiseEngine
from weightsmith.engine.stats import Gram


def _ids(n=5, seq=24, vocab=256, seed=0):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _engine_logits(eng, ids, **kw):
    h = eng.run(ids, **kw)
    out = torch.empty(ids.shape[0], ids.shape[1], eng.view.vocab)

    def fn(sl, logits):
        out[sl] = logits

    eng.head(h, fn)
    return out


def test_final_logits_equal_full_forward(family, tiny_model):
    path = tiny_model(family)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    eng = LayerwiseEngine(Checkpoint(path), batch_size=2)  # 5 windows -> batches of 2, 2, 1
    got = _engine_logits(eng, ids)
    assert (got - ref).abs().max() < 1e-5


def _full_model_grams(model, view, ids):
    """Reference: X^T X of linear inputs collected by hooks on the ordinary full model."""
    grams, hooks = {}, []
    mods = dict(model.named_modules())
    for i in range(view.num_layers):
        for lin in view.linears(i, include_router=True):
            if lin.group == "routed_experts":
                continue
            mod_name = (
                lin.prefix.replace(f"{view.family.moe.disk_root}.", f"{view.family.moe.module_root}.")
                if view.family.moe
                else lin.prefix
            )
            mod = mods[mod_name]

            def hook(m, inp, out, key=lin.prefix):
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                grams[key] = grams.get(key, 0) + x.T @ x

            hooks.append(mod.register_forward_hook(hook))
        if view.is_moe(i):
            experts = mods[f"{view.layer_prefix(i)}.{view.family.moe.module_root}.experts"]

            def ehook(m, args, out, i=i):
                x, idx = args[0], args[1]
                for e in range(m.gate_up_proj.shape[0]):
                    tok = (idx == e).any(-1)
                    xe = x[tok]
                    names = view.expert(i, e)
                    grams[names["gate"]] = grams.get(names["gate"], 0) + xe.T @ xe
                    g, u = torch.nn.functional.linear(xe, m.gate_up_proj[e]).chunk(2, dim=-1)
                    he = m.act_fn(g) * u
                    grams[names["down"]] = grams.get(names["down"], 0) + he.T @ he

            hooks.append(experts.register_forward_hook(ehook))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return grams


def test_hook_statistics_equal_full_model(family, tiny_model):
    path = tiny_model(family)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = _ids(n=4, seq=16)
    ck = Checkpoint(path)
    eng = LayerwiseEngine(ck, batch_size=3)
    ref = _full_model_grams(model, eng.view, ids)
    got: dict[str, Gram] = {}

    def process(layer):
        obs = {}
        for lin in layer.view.linears(layer.index, include_router=True):
            got[lin.prefix] = obs[lin.prefix] = Gram(layer.in_features(lin.prefix))
        layer.run(observe=obs, keep_outputs=False)

    eng.run(ids, process)
    assert set(ref) <= set(got)
    for k, r in ref.items():
        g = got[k].sum
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-4 * float(r.abs().max()) + 1e-6), k


def test_weight_replacement_and_choice_of_next_inputs(tiny_model):
    path = tiny_model("llama")
    ids = _ids()
    o_name = "model.layers.0.self_attn.o_proj.weight"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        original = model(ids).logits
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        zeroed = model(ids).logits

    def updated(layer):
        if layer.index == 0:
            layer.set_weight(
                o_name, torch.zeros_like(layer.tensor(o_name))
            )  # next layer sees updated outputs (default)

    def original_outputs(layer):
        if layer.index == 0:
            layer.next_inputs = layer.run()  # outputs before the change
            layer.set_weight(o_name, torch.zeros_like(layer.tensor(o_name)))

    eng = LayerwiseEngine(Checkpoint(path))
    assert (_engine_logits(eng, ids, process=updated) - zeroed).abs().max() < 1e-5
    eng = LayerwiseEngine(Checkpoint(path))
    assert (_engine_logits(eng, ids, process=original_outputs) - original).abs().max() < 1e-5


def test_only_one_layer_is_resident(tiny_model):
    path = tiny_model("qwen3_moe", layers=4)
    eng = LayerwiseEngine(Checkpoint(path))
    seen = []

    def process(layer):
        for i, m in enumerate(eng.layers):
            devices = {p.device.type for p in m.parameters()}
            seen.append((layer.index, i, devices))
            assert devices == ({"cpu"} if i == layer.index else {"meta"})

    eng.run(_ids(), process)
    assert len(seen) == 16
    assert all(p.device.type == "meta" for p in eng.model.parameters() if p is not None)


def test_disk_offload_gives_identical_results(tiny_model, tmp_path):
    path = tiny_model("mistral")
    ids = _ids()
    ram = _engine_logits(LayerwiseEngine(Checkpoint(path), offload="ram"), ids)
    eng = LayerwiseEngine(Checkpoint(path), offload="disk", offload_dir=str(tmp_path / "acts"))
    files_during = []
    disk = _engine_logits(eng, ids, process=lambda layer: files_during.append(len(list((tmp_path / "acts").iterdir()))))
    assert torch.equal(ram, disk)
    assert max(files_during) >= 1
    assert list((tmp_path / "acts").iterdir()) == []  # activation files are removed as the engine advances / at close


def test_experts_without_tokens_are_reported(tiny_model):
    path = tiny_model("mixtral")
    ck = Checkpoint(path)
    eng = LayerwiseEngine(ck)

    def starve(layer):  # identical router rows: every token ties, top-2 always picks the same two experts
        router = f"{layer.view.router(layer.index)}.weight"
        w = layer.tensor(router).clone()
        w[:] = w[0]
        layer.set_weight(router, w)

    eng.run(_ids(), starve)
    for st in eng.layer_stats:
        assert sorted(st.expert_tokens) == [0, 0, 5 * 24, 5 * 24]  # two experts never see a token


def test_quantized_checkpoints_refused(tiny_model, tmp_path):
    import json
    import shutil

    from weightsmith.errors import UnsupportedError

    src = tmp_path / "q"
    shutil.copytree(tiny_model("llama"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="gptq"):
        LayerwiseEngine(Checkpoint(src))


def test_layerwise_eval_matches_full(tiny_model, cli, hamlet):
    import json

    path = tiny_model("deepseek_v3")
    a = json.loads(cli("eval", path, "--text", hamlet, "--length", "32", "--windows", "3", "--json").out)
    b = json.loads(cli("eval", path, "--text", hamlet, "--length", "32", "--windows", "3", "--json", "--layerwise").out)
    assert abs(a["perplexity"] - b["perplexity"]) < 1e-4 * a["perplexity"]


@pytest.mark.slow
def test_smollm2_engine_equals_full_model(smollm2, hamlet):
    from transformers import AutoTokenizer

    from weightsmith.eval.text import read_text, token_windows

    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = token_windows(tok, read_text(hamlet), 128, 3)
    model = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    with torch.no_grad():
        ref = model(ids).logits
    eng = LayerwiseEngine(Checkpoint(smollm2), batch_size=2)
    got = _engine_logits(eng, ids)
    assert (got - ref).abs().max() < 1e-3
    assert (got.argmax(-1) == ref.argmax(-1)).all()
