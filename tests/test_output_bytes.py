"""Every pass writes the same bytes as before: sha256 of each output file on tiny models, pinned.

The pins in tests/output_bytes.json were computed from the code before a refactor; a change of
structure (moving modules, splitting plan from run) must not change a single output byte. When a
change is *meant* to alter outputs, regenerate the pins and say why in the commit:

    WEIGHTSMITH_PIN_OUTPUTS=1 python -m pytest -q tests/test_output_bytes.py

Only files whose bytes do not depend on where the run happened are pinned (tensors, config.json,
the quantization sidecars, tokenizer files); manifest.json and the card record paths of the
temporary inputs: the card is pinned with the temporary paths blanked out, the manifest
through its parameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

PINS = Path(__file__).parent / "output_bytes.json"
CAL = ("--calib-samples", "4", "--calib-length", "64")
SKIP = {"manifest.json", "README.md"}


def _digest(out: Path, tmp: Path, hamlet: Path) -> dict[str, str]:
    def blank(text: str) -> str:  # the places the run happened in, not what it wrote
        # pytest numbers the tiny models' directories in the order tests ask for them: blank the names too
        text = re.sub(r"<tmp>/[^\s|`'\"]+", "<tmp>/...", text.replace(str(tmp), "<tmp>")).replace(
            str(hamlet), "<hamlet>"
        )
        # cards name inputs without their directories: tiny-llama0, tiny-llama3... as pytest numbered them
        return re.sub(r"\btiny-[A-Za-z0-9_]+", "tiny-*", text)

    files = {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }
    got = {k: v for k, v in files.items() if k not in SKIP}
    man = json.loads((out / "manifest.json").read_text())
    # the manifest's parameters and per-file hashes of the outputs do not depend on where inputs lived
    card = blank((out / "README.md").read_text())
    got["README.md"] = hashlib.sha256(card.encode()).hexdigest()
    got["manifest:parameters"] = hashlib.sha256(
        blank(json.dumps(man["parameters"], sort_keys=True)).encode()
    ).hexdigest()
    return got


def _cases(tiny_model, hamlet, tmp_path):
    llama = tiny_model("llama")
    hm = str(hamlet)
    yield "import-llama", ("import", llama)
    yield "import-bf16-mixtral", ("import", tiny_model("mixtral"), "--dtype", "bfloat16")
    yield "quant-rtn-llama", ("quant", llama, "--method", "rtn", "--bits", "4", "--group-size", "32")
    yield (
        "quant-rtn-ct-qwen3",
        (
            "quant",
            tiny_model("qwen3"),
            "--method",
            "rtn",
            "--group-size",
            "-1",
            "--bits",
            "3",
            "--format",
            "compressed-tensors",
        ),
    )
    yield "quant-gptq-mixtral", ("quant", tiny_model("mixtral"), "--calib", hm, *CAL, "--min-expert-tokens", "8")
    yield "merge-llama", ("merge", "--parent", llama, "--parent", tiny_model("llama", seed=1), "--weights", "0.3,0.7")
    yield "prune-llama", ("prune", llama, "--ffn", "48", "--heads", "2", "--calib", hm, *CAL)
    yield "prune-layers-qwen2", ("prune", tiny_model("qwen2", layers=4), "--layers", "3", "--calib", hm, *CAL)
    yield (
        "minitron-llama",
        (
            "minitron",
            tiny_model("llama", layers=3),
            "--params",
            "0.75",
            "--calib",
            hm,
            "--calib-samples",
            "8",
            "--calib-length",
            "64",
            "--score-windows",
            "2",
        ),
    )
    yield "mla-llama", ("mla", tiny_model("llama", initializer_range=0.25), "--calib", hm, *CAL, "--loss-windows", "2")
    yield "mla-qwen2", ("mla", tiny_model("qwen2", initializer_range=0.25), "--calib", hm, *CAL, "--loss-windows", "2")


def _dst_index(args: tuple) -> int:
    # merge takes its output first (any number of --parent); every other pass takes it last
    return 1 if args[0] == "merge" else len(args)


def test_every_pass_writes_the_pinned_bytes(tiny_model, hamlet, cli, tmp_path, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()  # the tiny models and the outputs live under it
    got: dict[str, dict[str, str]] = {}
    cases = list(_cases(tiny_model, hamlet, tmp_path))
    for name, args in cases:
        out = tmp_path / name
        argv = list(args)
        argv.insert(_dst_index(args), out)
        r = cli(*argv)
        assert r.code == 0, (name, r)
        got[name] = _digest(out, base, hamlet)
    # distill on the pruned student, with the source as its teacher
    out = tmp_path / "distill-llama"
    r = cli(
        "distill",
        tmp_path / "prune-llama",
        tiny_model("llama"),
        out,
        "--calib",
        hamlet,
        "--tokens",
        "1024",
        "--calib-length",
        "64",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
    )
    assert r.code == 0, r
    got["distill-llama"] = _digest(out, base, hamlet)
    if os.environ.get("WEIGHTSMITH_PIN_OUTPUTS"):
        PINS.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {PINS}")
    pinned = json.loads(PINS.read_text())
    assert set(got) == set(pinned)
    for name in sorted(pinned):
        assert got[name] == pinned[name], f"{name}: output bytes changed"
