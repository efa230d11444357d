"""Screens of pruning ideas that were measured and not built into `weightsmith prune` (docs/pruning.md,
"Screened, not built"). Each screen edits the source model in memory with plain transformers modules
and prints hamlet perplexity next to its baseline on the same windows.

    .venv/bin/python bench/prune_screen.py slice [--fractions 0,0.2] [--calib-samples 16] [--eval-windows 8]
    .venv/bin/python bench/prune_screen.py bias [--ffn 992] [--variants none,flap,ls,ls+intercept] [--ridge 0.3]
        [--select minitron|flap] [--tag=-flap]

slice: SliceGPT's idea with the one basis a stock config allows. Every norm's scale is folded into the
projections that read its output, the residual stream is rotated into the principal basis of the
normalised norm inputs (summed over every norm of the model, on calibration windows), and the
hidden size is cut to the leading (1 - fraction) directions; each norm keeps a scalar that restores
the RMS of the kept part. SliceGPT rotates every layer separately and adds a matrix on each residual
connection, which no stock config has; one global basis needs none. With a tied embedding the
final norm's scale cannot be folded (the LM head is the embedding), so `--head tied` keeps the best
diagonal scale in the rotated basis and `--head untied` writes a separate LM head (28M more
parameters on SmolLM2: the budget is then spent on the untie).

bias: the repair of down_proj after MLP neurons go (Minitron activation scores on the source, the
same kept neurons per layer for every variant), fitted layer by layer on the pruned model's inputs
with a fixed ridge (a fraction of the mean diagonal of the kept Gram; the pass cross-validates it):
`none` slicing; `flap` FLAP's bias compensation (slicing plus a down_proj bias W_R E[x_R]); `ls` the
least-squares repair of the pass; `ls+intercept` the same least squares with a bias as a free,
unregularised column (what a Llama config with `mlp_bias` could store). `--select flap` chooses the
neurons by FLAP's fluctuation metric instead of Minitron's score.

Calibration: political speeches (the bench's windows, seed 0); evaluation: hamlet.txt, 512-token
windows, fp32. Results JSON (bench/results/prune-screen-<screen>.json) records the git commit and date.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, save  # noqa: E402
from prune_heal import windows  # noqa: E402
from quant import smollm2  # noqa: E402


def _forward_hidden(model, ids: torch.Tensor, batch: int = 8) -> None:
    with torch.no_grad():
        for k in range(0, ids.shape[0], batch):
            model.model(ids[k : k + batch])


class _Stop(Exception):
    pass


def _keep(acts: dict, name: str, x: torch.Tensor) -> None:
    acts.setdefault(name, []).append(x.reshape(-1, x.shape[-1]).double())


def _norm_inputs(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of every RMSNorm of a Llama-style model (name -> [tokens, hidden], fp64)."""
    acts: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.model.named_modules():
        if name.endswith("layernorm") or name == "norm":
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: _keep(acts, n, i[0])))
    _forward_hidden(model, ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in acts.items()}


def slice_model(model, acts: dict[str, torch.Tensor], keep: int, head: str) -> None:
    """In place: fold norm scales, rotate the residual stream to the global principal basis, zero the
    directions past `keep` (exactly the sliced model: every writer's dropped rows and the embedding's
    dropped columns are zero, so the residual never has them; the norms' scalars see only the kept part)."""
    d = model.config.hidden_size
    cov = torch.zeros(d, d, dtype=torch.float64)
    for x in acts.values():
        xn = x / x.pow(2).mean(-1, keepdim=True).sqrt()
        cov += xn.T @ xn / xn.shape[0]
    q = torch.linalg.eigh(cov).eigenvectors.flip(1)  # columns by decreasing variance
    mask = torch.zeros(d, dtype=torch.float64)
    mask[:keep] = 1

    def kept_rms(name: str) -> float:
        # the scale that restores RMS over the full stream from the kept coordinates (padded model:
        # RMS over d of the kept part = |x_K| / sqrt(d); the source normalises by |x| / sqrt(d))
        y = acts[name] @ q
        return float((y[:, :keep].pow(2).sum(-1) / y.pow(2).sum(-1)).sqrt().mean())

    with torch.no_grad():
        emb = model.model.embed_tokens.weight.double()
        for i, layer in enumerate(model.model.layers):
            att, mlp = layer.self_attn, layer.mlp
            for norm, readers in (
                (layer.input_layernorm, (att.q_proj, att.k_proj, att.v_proj)),
                (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
            ):
                g = norm.weight.double()
                for lin in readers:
                    lin.weight.copy_((lin.weight.double() * g) @ q)
            for lin in (att.o_proj, mlp.down_proj):
                lin.weight.copy_((q.T @ lin.weight.double()) * mask[:, None])
            layer.input_layernorm.weight.fill_(kept_rms(f"layers.{i}.input_layernorm"))
            layer.post_attention_layernorm.weight.fill_(kept_rms(f"layers.{i}.post_attention_layernorm"))
        gf = model.model.norm.weight.double()
        if head == "untied":
            model.lm_head.weight = torch.nn.Parameter(((emb * gf) @ q * mask).float())
            model.config.tie_word_embeddings = False
            scale = torch.ones(d, dtype=torch.float64)
        else:  # tied: the best diagonal approximation of diag(gf) in the rotated basis
            scale = ((q * q) * gf[:, None]).sum(0)
        model.model.norm.weight.copy_(scale * kept_rms("norm"))
        model.model.embed_tokens.weight.copy_(((emb @ q) * mask).float())


def keep_neurons(model, ids: torch.Tensor, ffn: int, select: str = "minitron") -> list[torch.Tensor]:
    """Per layer, the `ffn` MLP neurons with the largest score at the down_proj input of the source
    model: Minitron's (mean |x| over the window, L2 over windows) or FLAP's fluctuation (the variance
    of the neuron over all calibration tokens times ‖W_down[:, j]‖²)."""
    n = model.config.intermediate_size
    stats = [torch.zeros(3, n, dtype=torch.float64) for _ in model.model.layers]  # Σ mean|x|², Σ x, Σ x²

    def hook(k):
        def observe(m, inp, out):  # returns None: the layer's output is left as is
            x = inp[0].double()
            stats[k][0] += x.abs().mean(1).pow(2).sum(0)
            stats[k][1] += x.reshape(-1, n).sum(0)
            stats[k][2] += x.reshape(-1, n).pow(2).sum(0)

        return observe

    hooks = [layer.mlp.down_proj.register_forward_hook(hook(k)) for k, layer in enumerate(model.model.layers)]
    _forward_hidden(model, ids)
    for h in hooks:
        h.remove()
    tokens = ids.numel()
    keeps = []
    for k, layer in enumerate(model.model.layers):
        if select == "flap":
            var = stats[k][2] / tokens - (stats[k][1] / tokens) ** 2
            score = var * layer.mlp.down_proj.weight.double().pow(2).sum(0)
        else:
            score = stats[k][0]
        keeps.append(torch.sort(torch.topk(score, ffn).indices).values)
    return keeps


def _input_gram(model, ids: torch.Tensor, proj) -> torch.Tensor:
    """Σ [x, 1][x, 1]ᵀ of `proj`'s input over the calibration windows (the forward stops at `proj`)."""
    n = proj.in_features
    gram = torch.zeros(n + 1, n + 1, dtype=torch.float64)

    def collect(m, inp, out):
        x = inp[0].reshape(-1, n).double()
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        gram.add_(x.T @ x)
        raise _Stop

    h = proj.register_forward_hook(collect)
    with torch.no_grad():
        for k in range(0, ids.shape[0], 8):
            try:
                model.model(ids[k : k + 8])
            except _Stop:
                pass
    h.remove()
    return gram


def repair_down(model, ids: torch.Tensor, keeps: list[torch.Tensor], variant: str, ridge: float) -> None:
    """In place, layer by layer on the pruned model's inputs: the removed neurons' columns of
    down_proj are zeroed and the kept ones (and a bias) set by `variant`; `ls` is the pass's own
    repair (`refit.refit_columns`), `ls+intercept` the same normal equations with a constant input."""
    from weightsmith.prune.refit import refit_columns

    if variant not in ("none", "flap", "ls", "ls+intercept"):
        raise SystemExit(f"--variants: unknown variant {variant!r} (none, flap, ls, ls+intercept)")
    n = model.config.intermediate_size
    for i, layer in enumerate(model.model.layers):
        down = layer.mlp.down_proj
        w = down.weight.detach().double().clone()
        keep = keeps[i]
        removed = torch.ones(n, dtype=torch.bool)
        removed[keep] = False
        removed = removed.nonzero().flatten()
        new = torch.zeros_like(w)
        new[:, keep] = w[:, keep]
        bias = None
        if variant != "none":  # slicing needs no statistics
            gram = _input_gram(model, ids, down)
        if variant == "flap":
            mean = gram[-1, :n] / gram[-1, -1]
            bias = w[:, removed] @ mean[removed]
        elif variant == "ls":
            new[:, keep] = refit_columns(w, gram[:n, :n], keep, ridge)
        elif variant == "ls+intercept":
            cols = torch.cat([keep, torch.tensor([n])])
            g = gram[cols][:, cols]
            reg = torch.eye(cols.numel(), dtype=torch.float64) * ridge * float(g.diagonal()[: keep.numel()].mean())
            reg[-1, -1] = 0.0  # the bias is not shrunk
            corr = torch.linalg.solve(g + reg, (w[:, removed] @ gram[removed][:, cols]).T).T
            new[:, keep] += corr[:, : keep.numel()]
            bias = corr[:, -1]
        with torch.no_grad():
            down.weight.copy_(new.float())
            if bias is not None:
                down.bias = torch.nn.Parameter(bias.float())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("screen", choices=["slice", "bias"])
    ap.add_argument("--scratch", default="/tmp/weightsmith-bench/heal")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--fractions", default="0,0.2", help="slice: hidden fractions removed")
    ap.add_argument("--head", default="tied,untied", help="slice: tied and/or untied LM head")
    ap.add_argument("--ffn", type=int, default=992, help="bias: MLP neurons kept per layer (992 = --params 0.8)")
    ap.add_argument("--variants", default="none,flap,ls,ls+intercept")
    ap.add_argument(
        "--select", default="minitron", choices=["minitron", "flap"], help="bias: neuron scores (FLAP: fluctuation)"
    )
    ap.add_argument("--ridge", type=float, default=0.3, help="bias: ridge, a fraction of the kept Gram's mean diagonal")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from weightsmith.assets import hamlet
    from weightsmith.eval.perplexity import perplexity
    from weightsmith.eval.text import read_text, token_windows

    src = smollm2(Path(args.scratch))
    tok = AutoTokenizer.from_pretrained(src)
    ids = windows(tok, args.calib_samples, 256, 0)
    wins = token_windows(tok, read_text(hamlet()), 512, args.eval_windows, source="hamlet.txt")

    def load():
        return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()

    source = load()
    src_ppl = perplexity(source, wins)["perplexity"]
    meta = {**provenance(), "screen": args.screen, "threads": torch.get_num_threads(), "source_ppl": src_ppl}
    meta.update(calib_samples=args.calib_samples, calib_length=256, eval_windows=args.eval_windows)
    print(f"source: hamlet ppl {src_ppl:.2f} ({args.eval_windows} x 512 tokens)", flush=True)
    rows = []
    if args.screen == "slice":
        acts = _norm_inputs(source, ids)
        jobs = [(float(f), h) for h in args.head.split(",") for f in args.fractions.split(",")]
    else:
        keeps = keep_neurons(source, ids, args.ffn, args.select)
        jobs = args.variants.split(",")
    del source
    for job in jobs:
        t0 = time.perf_counter()
        model = load()
        if args.screen == "slice":
            frac, head = job
            keep = int(round(model.config.hidden_size * (1 - frac)))
            slice_model(model, acts, keep, head)
            row = {"fraction_removed": frac, "hidden_kept": keep, "head": head}
        else:
            repair_down(model, ids, keeps, job, args.ridge)
            row = {"variant": job, "select": args.select, "ffn": args.ffn, "ridge": args.ridge}
        ppl = perplexity(model, wins)["perplexity"]
        row.update(ppl=ppl, x_source=ppl / src_ppl, seconds=round(time.perf_counter() - t0, 1), load=os.getloadavg()[0])
        rows.append(row)
        print(row, flush=True)
        save(f"prune-screen-{args.screen}{args.tag}", {**meta, "rows": rows, "partial": True})
    save(f"prune-screen-{args.screen}{args.tag}", {**meta, "rows": rows})


if __name__ == "__main__":
    main()
