"""Every pass's model card loads with huggingface_hub's ModelCard.load and carries what the Hub uses."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from huggingface_hub import ModelCard

RELATION = {
    "import": None,
    "quant": "quantized",
    "prune": "finetune",
    "minitron": "finetune",
    "mla": "finetune",
    "distill": "finetune",
    "merge": "merge",
}


@pytest.fixture(scope="module")
def outputs(tiny_model, tmp_path_factory, hamlet):
    """One output of every pass, from a tiny Llama whose own card names a Hub model and a license."""
    from conftest import run_cli as cli

    tmp = tmp_path_factory.mktemp("cards")
    src = tmp / "src"
    shutil.copytree(tiny_model("llama"), src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: someorg/tiny-llama\n---\n# tiny\n")
    calib = ["--calib", hamlet, "--calib-samples", "4", "--calib-length", "32"]
    out = {name: tmp / name for name in RELATION}
    steps = {
        "import": ("import", src, out["import"]),
        "quant": ("quant", out["import"], out["quant"], "--method", "rtn", "--group-size", "32"),
        "prune": ("prune", out["import"], out["prune"], "--params", "0.8", "--importance", "magnitude"),
        "minitron": (
            "minitron",
            out["import"],
            out["minitron"],
            "--params",
            "0.8",
            "--candidates",
            "2",
            "--score-windows",
            "2",
            *calib,
        ),
        "mla": ("mla", out["import"], out["mla"], "--kv-ratio", "0.5", *calib),
        "distill": (
            "distill",
            out["prune"],
            out["import"],
            out["distill"],
            "--calib",
            hamlet,
            "--tokens",
            "128",
            "--calib-length",
            "32",
            "--batch-size",
            "2",
        ),
        "merge": ("merge", out["merge"], "--parent", out["import"], "--parent", src, "--weights", "0.5,0.5"),
    }
    for name, args in steps.items():
        r = cli(*args)
        assert r.code == 0, (name, r)
    return out


def test_every_pass_card_loads_with_hub_metadata(outputs):
    home = os.path.expanduser("~")
    for name, path in outputs.items():
        card = ModelCard.load(path / "README.md")
        data = card.data.to_dict()
        assert data["base_model"] == "someorg/tiny-llama", (name, data)
        assert data.get("base_model_relation") == RELATION[name], (name, data)
        assert data["license"] == "apache-2.0" and data["library_name"] == "transformers", (name, data)
        assert "weightsmith" in data["tags"] and name in data["tags"], (name, data)
        text = card.content
        assert str(path.parent) not in text and home not in text, name  # no machine paths in a public page
        assert len(text) < 20_000, (name, len(text))
    # the kept-index maps of the pruning passes live in a sidecar, listed in the manifest
    for name in ("prune", "minitron"):
        kept = json.loads((outputs[name] / "kept_indices.json").read_text())
        assert (
            kept
            and "kept_indices.json" in json.loads((outputs[name] / "manifest.json").read_text())["outputs"]["files"]
        )
        assert "kept_indices.json" in (outputs[name] / "README.md").read_text()


def test_gguf_license_and_embedded_hub_id():
    from weightsmith.assets import smollm2_gguf
    from weightsmith.checkpoint.card import gguf_meta

    meta = gguf_meta(smollm2_gguf())  # header fields only
    assert meta == {"license": "apache-2.0", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
