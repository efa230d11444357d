"""TransMLA's own conversion (RoRoPE + FreqFold + BKV-PCA) on given token windows, in its own venv.

    .venv-transmla/bin/python bench/anchors/run_transmla.py TRANSMLA_DIR SRC CALIB.pt EVAL.pt \
        --kv-lora-rank 128 --qk-mqa-dim 64 --freqfold 2 [--freqfold 4 ...]

TRANSMLA_DIR: the `transmla/transmla` folder of a checkout of github.com/fxmeng/TransMLA (the bench
used commit 9c0d254); its modules are imported unchanged (`partial_rope`, `low_rank_qkv`), with the
calibration windows weightsmith calibrates on (CALIB.pt, [N, L] int64) in place of its WikiText-2
loader. SRC: an fp32 Llama-family safetensors directory. EVAL.pt: the [N, L] evaluation windows;
perplexity = exp(mean next-token NLL over all windows), the formula of weightsmith's eval. Library
defaults otherwise (balance_kv_ratio 1, no q_lora, no qkv norm — TransMLA's own LlamaMLA modeling,
which has no latent RMSNorm). Prints one JSON line per FreqFold: {"freqfold", "ppl", "convert_s"},
after a first line with the source's ppl (measured once per EVAL.pt and source: cached in EVAL.pt.source-ppl.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("transmla_dir")
    ap.add_argument("src")
    ap.add_argument("calib")
    ap.add_argument("eval")
    ap.add_argument("--kv-lora-rank", type=int, required=True)
    ap.add_argument("--qk-mqa-dim", type=int, default=64)
    ap.add_argument("--freqfold", type=int, action="append", required=True)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    sys.path.insert(0, args.transmla_dir)

    import torch
    import torch.nn.functional as F
    from lora_qkv import low_rank_qkv  # noqa: E402  (TransMLA's code)
    from partial_rope import partial_rope  # noqa: E402
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(args.src)
    rp = getattr(cfg, "rope_parameters", None) or {}
    if "rope_theta" in rp:  # written by transformers 5.x; 4.52 reads the flat key
        cfg.rope_theta = rp["rope_theta"]
    base = AutoModelForCausalLM.from_pretrained(
        args.src, config=cfg, torch_dtype=torch.float32, attn_implementation="sdpa"
    )
    base.eval()
    calib = torch.load(args.calib)
    evalw = torch.load(args.eval)
    loader = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in calib.split(args.batch_size)]

    @torch.no_grad()
    def ppl(model) -> float:
        nll, n = 0.0, 0
        for b in evalw.split(4):
            logits = model(input_ids=b, use_cache=False).logits.float()
            nll += float(
                F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1), reduction="sum")
            )
            n += b[:, 1:].numel()
        return math.exp(nll / n)

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    collapse = head_dim // args.qk_mqa_dim
    # the source's perplexity once per (source, evaluation windows): later budgets of the same bench run reuse it
    cached = Path(f"{args.eval}.source-ppl.json")
    src_ppl = json.loads(cached.read_text()).get(args.src) if cached.exists() else None
    if src_ppl is None:
        src_ppl = ppl(base)
        cached.write_text(json.dumps({args.src: src_ppl}))
    print(json.dumps({"source_ppl": src_ppl, "head_dim": head_dim, "collapse": collapse}), flush=True)
    for ff in args.freqfold:
        model = copy.deepcopy(base)
        model.config.head_dim = head_dim
        t = time.perf_counter()
        kw = dict(
            freqfold=ff,
            collapse=collapse,
            qk_mqa_dim=args.qk_mqa_dim,
            kv_lora_rank=args.kv_lora_rank,
            q_lora_rank=None,
            use_qkv_norm=False,
            balance_kv_ratio=1.0,
        )
        with torch.no_grad():
            model = partial_rope(model, None, loader, None, **kw)
            model = low_rank_qkv(model, None, loader, None, **kw)
        secs = time.perf_counter() - t
        print(
            json.dumps(
                {
                    "freqfold": ff,
                    "kv_lora_rank": args.kv_lora_rank,
                    "qk_mqa_dim": args.qk_mqa_dim,
                    "ppl": ppl(model),
                    "convert_s": secs,
                }
            ),
            flush=True,
        )
        del model


if __name__ == "__main__":
    main()
