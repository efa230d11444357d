"""The Python API: each pass as a function taking its config dataclass; `import weightsmith` stays lean."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import weightsmith
from weightsmith.errors import UsageError


def test_import_is_lean():
    code = (
        "import sys, weightsmith; weightsmith.quant; weightsmith.merge; "
        "print(sorted(m for m in ('torch', 'transformers', 'safetensors', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_pass_functions_match_the_cli(tiny_model, tmp_path, cli):
    src = tiny_model("llama")
    res = weightsmith.quant(
        src, tmp_path / "api", weightsmith.QuantConfig(method="rtn", bits=4, group_size=32), progress=False
    )
    assert res.status == "written" and res.manifest["parameters"]["bits"] == 4
    assert cli("quant", src, tmp_path / "cli", "--method", "rtn", "--bits", "4", "--group-size", "32").code == 0
    for p in (tmp_path / "cli").iterdir():  # same code, same bytes
        if p.name not in ("manifest.json", "README.md"):
            assert p.read_bytes() == (tmp_path / "api" / p.name).read_bytes(), p.name
    assert (
        weightsmith.quant(src, tmp_path / "api", method="rtn", bits=4, group_size=32, progress=False).status
        == "up-to-date"
    )
    plan = weightsmith.prune(
        src, None, weightsmith.PruneConfig(params="0.8", importance="magnitude"), dry_run=True, progress=False
    )
    assert plan.status == "dry-run" and not (tmp_path / "none").exists()
    merged = weightsmith.merge(
        [src, src], None, weightsmith.MergeConfig(weights="0.5,0.5"), dry_run=True, progress=False
    )
    assert merged.status == "dry-run" and merged.plan.tensors
    with pytest.raises(UsageError, match="QuantConfig"):
        weightsmith.quant(src, tmp_path / "x", weightsmith.PruneConfig(ffn=64), progress=False)
    with pytest.raises(UsageError, match="bitz"):
        weightsmith.quant(src, tmp_path / "x", bitz=4, progress=False)
    with pytest.raises(UsageError, match="at least two"):
        weightsmith.merge(src, tmp_path / "x", progress=False)
    assert json.loads((tmp_path / "api" / "manifest.json").read_text())["pass"]["name"] == "quant"
