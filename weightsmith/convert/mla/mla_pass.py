"""`weightsmith mla SRC DST`: GQA → MLA (TransMLA / MHA2MLA) written as a stock DeepseekV3ForCausalLM.

Orchestration only; the maths is in the sibling modules. Flow: validate the source and the cache
budget → the engine pushes calibration text through the source one layer at a time, collecting per
layer the second moment of the attention input and a few windows of it → per layer and per
candidate (RoPE dims, FreqFold) the conversion is built and scored by the attention-output error
on those windows → the RoPE width with the smallest total error is chosen (FreqFold per layer) →
every layer is built again at the chosen setting and written with the DeepSeek names.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from weightsmith import dist
from weightsmith.arch import arch_for
from weightsmith.calib import CalibConfig
from weightsmith.checkpoint.writer import TensorSpec
from weightsmith.convert.mla import components as comp
from weightsmith.convert.mla.latent import constant_for, pseudo_constant_direction
from weightsmith.convert.mla.layer import SourceAttention, attention_metric, build_layer
from weightsmith.convert.mla.lowrank import pca_latent, svd_latent, weighted_pca_latent
from weightsmith.convert.mla.refit import refit_output, refit_values
from weightsmith.convert.mla.rope import longrope_factors, source_inv_freq
from weightsmith.convert.mla.simulate import cast_source, gqa_attention, relative_error
from weightsmith.engine.stats import Gram
from weightsmith.errors import UnsupportedError, UsageError
from weightsmith.passes import PassSpec, Plan, register
from weightsmith.util import dtype_from_name, element_size

NORM_EPS = 1e-6  # DeepseekV3RMSNorm's default eps (kv_a_layernorm / q_a_layernorm are built without one)
PSEUDO_MAX_CV = 0.1  # engine target: a pseudo-constant latent channel when wᵀx varies less than this over tokens
DENSE_SOURCES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class MlaConfig(CalibConfig):
    method: Literal["transmla", "mha2mla"] = field(
        default="transmla",
        metadata={
            "help": "transmla: RoRoPE + FreqFold + BKV-PCA (calibrated); mha2mla: partial-RoPE selection + joint/split "
            "SVD of the weights"
        },
    )
    target: Literal["exact", "engine"] = field(
        default="exact",
        metadata={
            "help": "exact: stock transformers, reproduces the source at full cache (constant latent channel, biases "
            "carried); engine: what vLLM/SGLang/FlashMLA serve (no biases, standard RoPE, calibrated latent norm)"
        },
    )
    kv_ratio: float | None = field(
        default=None,
        metadata={
            "help": "cache budget as a fraction of the source's KV values per token (default: 1.0 for exact; 512+64 or "
            "the full cache for engine)"
        },
    )
    kv_lora_rank: int | None = field(
        default=None,
        metadata={"help": "latent width (instead of --kv-ratio); the exact target adds one constant channel"},
    )
    rope_dim: int | None = field(
        default=None, metadata={"help": "dims of the shared decoupled RoPE key (default: searched on calibration loss)"}
    )
    freqfold: int | None = field(
        default=None,
        metadata={
            "help": "transmla on the engine target: adjacent frequencies folded per PCA block (default: searched per "
            "layer)"
        },
    )
    partial_rope: Literal["2norm", "high", "low", "uniform"] = field(
        default="2norm", metadata={"help": "mha2mla: which frequencies keep RoPE per KV head"}
    )
    svd: Literal["joint", "split"] = field(
        default="joint", metadata={"help": "mha2mla: one SVD of [W_k_nope; W_v] or separate ones"}
    )
    pca_metric: Literal["bkv", "attention", "auto"] = field(
        default="bkv",
        metadata={
            "help": "transmla latent PCA: bkv = TransMLA's balanced K/V PCA; attention = weighted by what each "
            "key/value direction costs the attention output (queries for keys, o_proj for values); auto = per layer, "
            "whichever of the two has the lower calibration loss"
        },
    )
    balance_kv: float = field(
        default=1.0, metadata={"help": "transmla: BKV-PCA balance multiplier (keys scaled to the values' norm / this)"}
    )
    loss_windows: int = field(default=2, metadata={"help": "calibration windows kept per layer to score candidates"})
    refit: Literal["values+output", "values", "none"] = field(
        default="values+output",
        metadata={
            "help": "values: after the latent and keys are fixed, refit kv_b_proj's value rows by ridge least "
            "squares against the source layer's per-head attention output on calibration windows; values+output: "
            "then refit o_proj the same way against the source layer's attention output (heads compensate each "
            "other); none: keep the PCA decoder and the source's o_proj"
        },
    )
    refit_windows: int = field(default=8, metadata={"help": "calibration windows per layer for --refit values"})
    refit_ridge: float = field(
        default=0.1,
        metadata={
            "help": "--refit values: ridge strength towards the PCA decoder, relative to the mean diagonal of "
            "the features' Gram matrix"
        },
    )
    dtype: Literal["keep", "float32", "bfloat16", "float16"] = field(default="keep", metadata={"help": "output dtype"})
    calib_samples: int = field(default=32, metadata={"help": "number of calibration windows"})
    calib_length: int = field(default=256, metadata={"help": "tokens per calibration window"})

    def __post_init__(self):
        if self.kv_ratio is not None and self.kv_lora_rank is not None:
            raise UsageError("give the cache budget as --kv-ratio or as --kv-lora-rank, not both")
        if self.kv_ratio is not None and not 0 < self.kv_ratio <= 1:
            raise UsageError(
                f"--kv-ratio {self.kv_ratio} is outside (0, 1]: it is the fraction of the source's KV cache kept"
            )
        if self.rope_dim is not None and (self.rope_dim <= 0 or self.rope_dim % 2):
            raise UsageError(f"--rope-dim {self.rope_dim} must be a positive even number (RoPE turns pairs of dims)")
        if self.freqfold is not None and (self.freqfold < 1 or self.freqfold & (self.freqfold - 1)):
            raise UsageError(f"--freqfold {self.freqfold} must be a power of two ≥ 1")
        if self.loss_windows < 1:
            raise UsageError("--loss-windows must be ≥ 1")
        if self.refit_windows < 1 or self.refit_ridge < 0:
            raise UsageError("--refit-windows must be ≥ 1 and --refit-ridge ≥ 0")


# ---- validation and budget -------------------------------------------------------------------------


def _check_source(cfg: MlaConfig, view) -> None:
    fam = view.family.name
    if view.family.attention.kind == "gqa" and view.family.attention.norms and not view.family.moe:
        raise UnsupportedError(
            f"{fam} normalises every query and key head (q_norm/k_norm) before RoPE; DeepSeek's layout has one "
            "RMSNorm over the whole latent and none on the queries or the RoPE key, so per-head normalisation "
            "cannot be expressed (exactly or as a fixed weight: it is a per-token, per-head scale). Dense sources "
            "without QK-norm: llama, mistral, qwen2"
        )
    if fam not in DENSE_SOURCES:
        if fam in ("mixtral", "qwen2_moe", "qwen3_moe"):
            raise UnsupportedError(
                f"{fam} is a MoE model: DeepseekV3's router (sigmoid scores, group-limited top-k, no shared-expert "
                "gate) cannot "
                "reproduce its softmax routing exactly, so weightsmith mla refuses rather than change which experts "
                "fire; dense sources: " + ", ".join(DENSE_SOURCES)
            )
        raise UnsupportedError(
            f"weightsmith mla converts GQA/MHA models ({', '.join(DENSE_SOURCES)}); {fam} is not one"
        )
    if getattr(view.config, "mlp_bias", False):
        raise UnsupportedError(
            "mlp_bias=true: DeepseekV3's MLP has no biases, so the source's MLP biases cannot be carried"
        )
    if view.heads % view.kv_heads:
        raise UnsupportedError(
            f"num_attention_heads {view.heads} is not a multiple of num_key_value_heads {view.kv_heads}"
        )


@dataclass
class Budget:
    total: int | None  # values per token and layer (latent + rope), constant channel excluded
    rank: int | None  # explicit latent width
    rope_candidates: list[int]
    source: int


def resolve_budget(cfg: MlaConfig, view) -> Budget:
    n_kv, d = view.kv_heads, view.head_dim
    S = 2 * n_kv * d
    if cfg.target == "engine":
        valid = [d // c for c in (1, 2, 4) if d % c == 0 and (d // c) % 2 == 0 and d // c >= 8] or [d]
        if cfg.method == "mha2mla":
            valid = [d]  # one KV head per frequency: needs the target's frequencies = the source's
    elif cfg.method == "mha2mla":
        valid = [n_kv * p for p in range(2, d + 1, 2)]
    else:
        valid = list(range(2, n_kv * d + 1, 2))
    if cfg.rope_dim is not None:
        if cfg.rope_dim not in valid:
            near = sorted(valid, key=lambda v: abs(v - cfg.rope_dim))[:4]
            why = {
                "engine": f"the engine target's shared standard-RoPE key needs head_dim {d} divisible by it (≤ "
                "head_dim)"
                + ("; mha2mla on the engine target needs exactly head_dim" if cfg.method == "mha2mla" else ""),
                "exact": f"at most n_kv·head_dim = {n_kv * d}"
                + (f", a multiple of 2·n_kv = {2 * n_kv}" if cfg.method == "mha2mla" else ""),
            }[cfg.target]
            raise UsageError(
                f"--rope-dim {cfg.rope_dim} is impossible for this source ({why}); nearest valid: "
                f"{', '.join(map(str, sorted(near)))}"
            )
        cands = [cfg.rope_dim]
    else:
        if cfg.target == "engine":
            cands = valid
        elif cfg.method == "mha2mla":
            cands = sorted({n_kv * p for p in (d // 8, d // 4, d // 2, d) if p >= 2 and p % 2 == 0})
        else:
            cands = sorted({v for v in (d // 2, d, 2 * d, 4 * d, n_kv * d) if 2 <= v <= n_kv * d and v % 2 == 0})
    if cfg.kv_lora_rank is not None:
        if cfg.kv_lora_rank < 1:
            raise UsageError("--kv-lora-rank must be ≥ 1")
        hi = max(S - min(cands), 1)
        if cfg.kv_lora_rank > S - min(cands):
            raise UsageError(
                f"--kv-lora-rank {cfg.kv_lora_rank} is above what this source allows: the latent holds at most "
                f"2·n_kv·head_dim − rope_dim = {S} − {min(cands)} = {hi} values; valid range 1..{hi}"
            )
        cands = [c for c in cands if cfg.kv_lora_rank <= S - c] or cands
        return Budget(None, cfg.kv_lora_rank, cands, S)
    ratio = cfg.kv_ratio
    if ratio is None:
        if cfg.target == "engine" and S >= 576 and d >= 64:
            return Budget(None, 512, [64] if cfg.rope_dim is None else cands, S)
        ratio = 1.0
    total = int(round(ratio * S))
    ok = [c for c in cands if 1 <= total - c]
    if not ok:
        raise UsageError(
            f"--kv-ratio {ratio} leaves {total} cached values per layer, not enough for {min(cands)} RoPE dims and a "
            f"latent; use a ratio ≥ {(min(cands) + 1) / S:.3f}"
        )
    return Budget(total, None, ok, S)


def _latent_rank(b: Budget, d_r: int) -> int:
    return b.rank if b.rank is not None else b.total - d_r


def _folds(cfg: MlaConfig, d: int, d_r: int) -> list[int]:
    """FreqFold candidates (transmla, a shared standard-RoPE key of d_r ≤ head_dim dims)."""
    collapse = d // d_r
    if cfg.freqfold is not None:
        if cfg.freqfold % collapse or cfg.freqfold > d // 2:
            raise UsageError(
                f"--freqfold {cfg.freqfold} must be a multiple of head_dim/rope_dim = {collapse} and ≤ head_dim/2 = "
                f"{d // 2}"
            )
        return [cfg.freqfold]
    return [f for f in (collapse, 2 * collapse, 4 * collapse, 8 * collapse) if f <= d // 2]


def _foldable(d: int, d_r: int) -> bool:
    return d_r <= d and d % d_r == 0 and (d // d_r) <= d // 2


# ---- per layer ------------------------------------------------------------------------------------


def load_source_attention(ck, view, i: int, inv_freq: torch.Tensor) -> SourceAttention:
    a = view.attention(i)
    H = view.hidden

    def aug(role):
        w = ck.get(a[role] + ".weight").double()
        b = (
            ck.get(a[role] + ".bias").double()
            if (a[role] + ".bias") in ck
            else torch.zeros(w.shape[0], dtype=torch.float64)
        )
        return torch.cat([w, b[:, None]], 1)

    wo = ck.get(a["o"] + ".weight").double()
    bo = ck.get(a["o"] + ".bias").double() if (a["o"] + ".bias") in ck else None
    assert wo.shape[0] == H
    return SourceAttention(
        aug("q"), aug("k"), aug("v"), wo, bo, view.heads, view.kv_heads, view.head_dim, inv_freq.double()
    )


def rope_setups(cfg: MlaConfig, view, sources: list[SourceAttention], stats: list, d_r: int) -> dict:
    """family -> {fold -> (blocks, basis)} for one RoPE width. The RoPE frequency table is one config
    for the whole model, so a family (which frequencies the kept pairs turn at) is chosen for all
    layers at once; only the FreqFold within the "freqfold" family (always the standard table) may
    differ per layer.

    Families: "freqfold" (TransMLA's RoRoPE + FreqFold: blocks of adjacent frequencies across KV
    heads, each keeping fold·d_r/d components at the standard table's frequencies; the engine
    target's only one), "pairs" (exact target: one block per frequency, exact rotations, RoPE pairs
    allocated across frequencies by score), "heads" (mha2mla: frequencies kept per KV head)."""
    n_h, n_kv, d = view.heads, view.kv_heads, view.head_dim
    inv = sources[0].inv_freq

    def two_norm():  # summed over layers: the kept frequencies must be the same in every layer
        return sum(comp.two_norm_scores(s.wk, s.wq, C, n_h=n_h, n_kv=n_kv, d=d) for s, (C, _) in zip(sources, stats))

    def freqfold():
        return {f: (comp.freqfold_blocks(n_kv, d, d_r, f, inv), "pca") for f in _folds(cfg, d, d_r)}

    if cfg.target == "engine":
        if cfg.method == "mha2mla":  # 2norm: each target frequency in its best KV head
            return {"heads": {None: (comp.engine_head_selection_blocks(n_kv, d, d_r, two_norm(), inv), "identity")}}
        return {"freqfold": freqfold()}
    if cfg.method == "transmla":
        out = {"freqfold": freqfold()} if _foldable(d, d_r) else {}
        if cfg.freqfold is None:
            base = comp.single_frequency_blocks(n_kv, d)
            scores = [
                comp.block_scores(s.wk, s.wq, C, n_h=n_h, n_kv=n_kv, d=d, blocks=base)
                for s, (C, _) in zip(sources, stats)
            ]
            counts = comp.allocate_pairs(scores, d_r // 2)
            out["pairs"] = {None: (comp.single_frequency_blocks(n_kv, d, counts), "pca")}
        return out
    score = two_norm() if cfg.partial_rope == "2norm" else None
    kept = comp.partial_rope_frequencies(cfg.partial_rope, n_kv, d, d_r // (2 * n_kv), score)
    return {"heads": {None: (comp.head_selection_blocks(n_kv, d, kept), "identity")}}


def convert_layer(
    cfg: MlaConfig,
    src: SourceAttention,
    C: torch.Tensor,
    samples: torch.Tensor,
    *,
    blocks,
    basis: str,
    rank: int,
    constant: float | None,
    metric: str | None = None,
    pseudo: float | None = None,
):
    """rank: the written latent width without the exact target's constant channel (constant adds one);
    on the engine target a pseudo-constant channel (pseudo = its M) takes one of the `rank`."""
    split = comp.build_split(
        src.wk, src.wq, C, n_h=src.n_h, n_kv=src.n_kv, d=src.d, inv_freq=src.inv_freq, blocks=blocks, basis=basis
    )
    if pseudo is not None and pseudo_constant_direction(C)[1] >= PSEUDO_MAX_CV:
        pseudo = None  # no nearly constant direction in this layer's input: calibrated norm, uncentered latent
    centered = constant is not None or pseudo is not None
    if pseudo is not None:
        rank -= 1
    metric = metric or ("bkv" if cfg.pca_metric == "auto" else cfg.pca_metric)
    if cfg.method == "transmla" and metric == "attention":
        lat = weighted_pca_latent(split.nope_k, src.wv, C, rank, attention_metric(src, split, C), centered=centered)
    elif cfg.method == "transmla":
        lat = pca_latent(split.nope_k, src.wv, C, rank, centered=centered, balance=cfg.balance_kv)
    else:
        lat = svd_latent(split.nope_k, src.wv, rank, split=cfg.svd == "split")
        if not centered:
            lat.mean.zero_()
    layer = build_layer(
        src,
        split,
        lat,
        constant=constant,
        samples=samples.reshape(-1, samples.shape[-1]),
        eps=NORM_EPS,
        C=C,
        pseudo=pseudo,
        max_cv=PSEUDO_MAX_CV,
    )
    return layer, split, lat


# ---- plan / run -----------------------------------------------------------------------------------


def _validate(cfg: MlaConfig, ctx):
    ck = ctx.source
    view = arch_for(ck.config)
    _check_source(cfg, view)
    budget = resolve_budget(cfg, view)
    inv = source_inv_freq(ck.config, view.head_dim)
    if cfg.target == "engine" and cfg.method == "mha2mla" and cfg.partial_rope != "2norm":
        raise UsageError(
            f"--partial-rope {cfg.partial_rope} keeps the same frequencies in every KV head, which one shared "
            "standard-RoPE key "
            "(the engine target) cannot hold; use --partial-rope 2norm (each frequency kept for its best KV head) or "
            "--target exact"
        )
    if cfg.target == "engine":
        rp = dict(getattr(ck.config, "rope_parameters", None) or {})
        if rp.get("rope_type", "default") != "default":
            raise UnsupportedError(
                f"rope_type {rp.get('rope_type')!r}: the engine target needs plain RoPE (vLLM/SGLang rewrite any other "
                "DeepSeek rope type "
                "to deepseek_yarn); use --target exact, which carries the source's frequencies exactly"
            )
        for lin in view.linears(0):
            if lin.group == "attention" and lin.bias and (lin.prefix + ".bias") in ck:
                raise UnsupportedError(
                    f"{lin.prefix}.bias: the engine target has no attention biases (vLLM/SGLang build every DeepSeek "
                    "projection "
                    "with bias=False); use --target exact, which carries q/k/v/o biases exactly"
                )
    return view, budget, inv


def plan(cfg: MlaConfig, ctx) -> Plan:
    view, budget, inv = _validate(cfg, ctx)
    summary = {
        "method": cfg.method,
        "target": cfg.target,
        "source_kv_values_per_layer": budget.source,
        "budget_values_per_layer": budget.total if budget.total is not None else f"rank {budget.rank} + rope",
        "rope_dim_candidates": budget.rope_candidates,
    }
    # the output's shapes depend on the calibration (RoPE frequencies kept): run() plans the writer
    # state: what _validate found (picklable: under a launcher rank 0 plans and broadcasts the plan)
    return Plan(tensors=None, config=None, summary=summary, state=(budget, inv))


def _out_config(
    ck, view, cfg: MlaConfig, *, d_n: int, d_r: int, rank: int, q_lora: int | None, freqs: torch.Tensor, dtype
):
    from transformers import DeepseekV3Config

    src = ck.config
    rp = dict(getattr(src, "rope_parameters", None) or {})
    base = float(rp.get("rope_theta", getattr(src, "rope_theta", 10000.0)))
    default = 1.0 / (base ** (torch.arange(0, d_r, 2, dtype=torch.int64).float() / d_r))
    if cfg.target == "engine" or torch.equal(default, freqs.float()):
        # engine: the kept pairs turn at source frequencies p·(d/d_r), which *are* the standard table
        # over d_r dims (float32 may differ in the last bit; vLLM only serves plain tables)
        rope = {"rope_type": "default", "rope_theta": base}
    else:
        fac = longrope_factors(freqs.float(), base)
        mpe = int(getattr(src, "max_position_embeddings", 4096))
        rope = {
            "rope_type": "longrope",
            "rope_theta": base,
            "short_factor": fac,
            "long_factor": fac,
            "original_max_position_embeddings": mpe,
            "factor": 1.0,
            "attention_factor": 1.0,
        }
    kw = dict(
        vocab_size=view.vocab,
        hidden_size=view.hidden,
        intermediate_size=view.ffn,
        moe_intermediate_size=view.ffn,
        num_hidden_layers=view.num_layers,
        num_attention_heads=view.heads,
        num_key_value_heads=view.heads,
        n_shared_experts=1,
        n_routed_experts=1,
        num_experts_per_tok=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=view.num_layers,
        kv_lora_rank=rank,
        q_lora_rank=q_lora,
        qk_rope_head_dim=d_r,
        v_head_dim=view.head_dim,
        qk_nope_head_dim=d_n,
        hidden_act=getattr(src, "hidden_act", "silu"),
        max_position_embeddings=int(getattr(src, "max_position_embeddings", 4096)),
        rms_norm_eps=float(getattr(src, "rms_norm_eps", 1e-6)),
        tie_word_embeddings=view.tied,
        rope_parameters=rope,
        rope_interleave=True,
        attention_bias=cfg.target == "exact",
        bos_token_id=getattr(src, "bos_token_id", None),
        eos_token_id=getattr(src, "eos_token_id", None),
        pad_token_id=getattr(src, "pad_token_id", None),
    )
    out = DeepseekV3Config(**kw)
    out.architectures = ["DeepseekV3ForCausalLM"]
    out.dtype = dtype
    return out


@contextlib.contextmanager
def _one_thread():
    """The conversion maths is many small eigendecompositions and matmuls: OpenMP's threading costs
    more than it gains there (10× slower on a loaded 2-core machine), so run it on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Sources:
    """Each layer's source attention, read from the (memory-mapped) checkpoint when asked for, so
    that only one layer's float64 copy is alive at a time."""

    def __init__(self, ck, view, inv):
        self.ck, self.view, self.inv = ck, view, inv

    def __len__(self):
        return self.view.num_layers

    def __getitem__(self, i: int) -> SourceAttention:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return load_source_attention(self.ck, self.view, i, self.inv)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class _LayerStats:
    """Second moment of [x; 1] (the attention input with a constant, so biases ride along) via the
    engine's Gram accumulator, plus the first `keep` windows of x (of the whole calibration set:
    `first` is the index of this rank's first window) to score candidates on."""

    def __init__(self, hidden: int, keep: int, first: int = 0):
        self.gram = Gram(hidden + 1, dtype=torch.float64)
        self.samples: list[torch.Tensor] = []
        self.keep, self.seen = keep, first

    def __call__(self, inp, out):
        x = inp.detach().to("cpu", torch.float64)
        self.gram(torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=torch.float64)], -1), out)
        for b in range(x.shape[0]):
            if self.seen < self.keep:
                self.samples.append(x[b].clone())
            self.seen += 1

    def finish(self):
        return self.gram.mean, torch.stack(self.samples)


def _to_owner(samples: list[torch.Tensor], owner: int) -> list[torch.Tensor] | None:
    """The scoring windows of a layer, from the ranks that computed them to the layer's owner
    (rank order is window order). Sent as float32, the engine's activation dtype: lossless."""
    w = dist.world()
    if not w.distributed:
        return samples
    parts = dist.gather_objects([s.float() for s in samples])  # a few windows per layer
    return [s.double() for part in parts for s in part] if w.rank == owner else None


def run(cfg: MlaConfig, ctx, plan: Plan) -> None:
    """Under a launcher: each rank pushes its block of the windows; the second moments are summed in
    rank order; each layer is then converted by one owner rank (the layers dealt by cost, equal for a
    dense model), which alone keeps that layer's scoring windows, scores its candidates and writes its
    tensors; the candidate losses are gathered so every rank picks the same RoPE width and FreqFold."""
    ck = ctx.source
    view = arch_for(ck.config)
    budget, inv = plan.state
    out_dtype = ck.info(view.family.embed).dtype if cfg.dtype == "keep" else dtype_from_name(cfg.dtype)
    constant = constant_for(out_dtype) if cfg.target == "exact" else None
    pseudo = constant_for(out_dtype) if cfg.target == "engine" else None
    calib = ctx.calibrate(cfg, shard=True)  # this rank's windows
    first = dist.shard(calib.total).start
    engine = ctx.engine()
    n_layers = view.num_layers
    owner = dist.assign_owners([1.0] * n_layers)  # every layer costs the same to convert
    me = dist.world().rank
    mine = [i for i in range(n_layers) if owner[i] == me]
    moments: list[torch.Tensor] = []  # per layer: second moment (every rank)
    windows: dict[int, torch.Tensor] = {}  # per owned layer: the first windows (scoring and --refit)
    keep = max(cfg.loss_windows, cfg.refit_windows if cfg.refit != "none" else 0)

    def process(layer):
        st = _LayerStats(view.hidden, keep, first)
        layer.run(observe={view.attention(layer.index)["k"]: st}, keep_outputs=False)
        st.gram.reduce()
        moments.append(st.gram.mean)
        got = _to_owner(st.samples, owner[layer.index])
        if got is not None:
            windows[layer.index] = torch.stack(got)

    engine.run(calib.ids, process)
    engine.close()
    # stats[i] = (second moment, scoring windows); the windows only on the layer's owner
    stats = [(C, windows[i][: cfg.loss_windows] if i in windows else None) for i, C in enumerate(moments)]
    with _one_thread():
        sources = _Sources(ck, view, inv)
        refs = {i: gqa_attention(stats[i][1].float(), cast_source(sources[i], torch.float32)) for i in mine}
        # choose the RoPE width and family (one config) on the summed calibration loss, FreqFold per layer;
        # the setups come from the second moments alone (rank 0's, so every rank uses the same blocks)
        setups = None
        if dist.world().is_main:
            setups = {
                (d_r, fam): folds
                for d_r in budget.rope_candidates
                for fam, folds in rope_setups(cfg, view, sources, stats, d_r).items()
            }
        setups = dist.broadcast_object(setups, 0)
        losses: dict[tuple, list[float]] = {}
        if sum(len(v) for v in setups.values()) > 1:
            part: dict[tuple, dict[int, float]] = {}
            for (d_r, fam), by_fold in ctx.report.track(list(setups.items()), desc="scoring RoPE widths"):
                for f, (blocks, basis) in by_fold.items():
                    part[(d_r, fam, f)] = {
                        i: relative_error(
                            stats[i][1],
                            sources[i],
                            convert_layer(
                                cfg,
                                sources[i],
                                stats[i][0],
                                stats[i][1],
                                blocks=blocks,
                                basis=basis,
                                rank=_latent_rank(budget, d_r),
                                constant=constant,
                                pseudo=pseudo,
                            )[0],
                            eps=NORM_EPS,
                            ref=refs[i],
                        )
                        for i in mine
                    }
            for got in dist.gather_objects(part):
                for k, by_layer in got.items():
                    losses.setdefault(k, [0.0] * n_layers)
                    for i, v in by_layer.items():
                        losses[k][i] = v
            totals = {k: sum(min(losses[(*k, f)][i] for f in setups[k]) for i in range(n_layers)) for k in setups}
            key = min(totals, key=lambda k: (totals[k], -k[0], k[1]))
            ctx.metrics["rope_dim_search"] = {
                f"{k[0]} {k[1]}": round(v / n_layers, 8) for k, v in sorted(totals.items())
            }
            if len(setups[key]) > 1:
                ctx.metrics["freqfold_search"] = {
                    str(f): round(sum(losses[(*key, f)]) / n_layers, 8) for f in setups[key]
                }
        else:
            key = next(iter(setups))
        d_r = key[0]
        rank = _latent_rank(budget, d_r)
        folds = [
            min(setups[key], key=lambda f: losses[(*key, f)][i]) if len(setups[key]) > 1 else next(iter(setups[key]))
            for i in range(n_layers)
        ]
        built: dict[int, object] = {}
        layer_metrics: dict[int, dict] = {}
        for i in ctx.report.track(mine, desc="building MLA layers"):
            (C, x), src = stats[i], sources[i]
            blocks, basis = setups[key][folds[i]]
            metrics = ["bkv", "attention"] if cfg.method == "transmla" and cfg.pca_metric == "auto" else [None]
            best = None
            for metric in metrics:
                L, split, lat = convert_layer(
                    cfg,
                    src,
                    C,
                    x,
                    blocks=blocks,
                    basis=basis,
                    rank=rank,
                    constant=constant,
                    metric=metric,
                    pseudo=pseudo,
                )
                err = relative_error(x, src, L, eps=NORM_EPS, ref=refs[i])
                if best is None or err < best[0]:
                    best = (err, L, split, lat, metric)
            err, L, split, lat, metric = best
            refit = {}
            if cfg.refit != "none" and err > 1e-9:  # (nothing to fix at full cache: keep it exact)
                L = refit_values(src, L, windows[i], ridge=cfg.refit_ridge, eps=NORM_EPS)
                if cfg.refit == "values+output":
                    L = refit_output(src, L, windows[i], ridge=cfg.refit_ridge, eps=NORM_EPS)
                refit = {"attention_output_error_before_refit": round(err, 8)}
                err = relative_error(x, src, L, eps=NORM_EPS, ref=refs[i])  # on windows inside the fit set: optimistic
            layer_metrics[i] = {
                **refit,
                "layer": i,
                "attention_output_error": round(err, 8),
                "latent_error": round(lat.error, 8),
                "key_nope_error": round(lat.key_error, 8),
                "value_error": round(lat.value_error, 8),
                "rope_key_energy_kept": round(split.kept_energy, 6),
                "rope_family": key[1],
                "freqfold": folds[i],
                "kv_balance": round(lat.ratio, 6),
                **({"pca_metric": metric} if metric else {}),
            }
            built[i] = L
        del sources, refs
        stats.clear()
        moments.clear()
        windows.clear()
    # what every rank needs of the layers it did not build: their tensor shapes and metrics
    shapes: dict[int, dict[str, tuple]] = {}
    metrics_by_layer: dict[int, dict] = {}
    for got in dist.gather_objects(
        ({i: {k: tuple(t.shape) for k, t in L.tensors.items()} for i, L in built.items()}, layer_metrics)
    ):
        shapes.update(got[0])
        metrics_by_layer.update(got[1])
    first_layer = dist.broadcast_object(
        {"d_n": built[0].d_n, "rank": built[0].rank, "rope_freq": built[0].rope_freq} if 0 in built else None,
        owner[0],
    )
    q_lora = view.hidden + 1 if "q_a" in shapes[0] else None
    out_cfg = _out_config(
        ck,
        view,
        cfg,
        d_n=first_layer["d_n"],
        d_r=d_r,
        rank=first_layer["rank"],
        q_lora=q_lora,
        freqs=first_layer["rope_freq"],
        dtype=out_dtype,
    )
    target_view = arch_for(out_cfg)
    names = {"q": "q", "q_a": "q_a", "q_b": "q_b", "kv_a": "kv_a", "kv_b": "kv_b", "o": "o"}
    specs, copies, own = [], [], []  # own: this rank's converted tensors
    for g in view.global_tensors():
        specs.append(TensorSpec(g, ck.info(g).shape, out_dtype))
        copies.append((g, None))
    for i in range(n_layers):
        ta = target_view.attention(i)
        tn = target_view.attention_norms(i)
        out = {}
        for role, k in names.items():
            if k in shapes[i] and role in ta:
                out[ta[role] + ".weight"] = k
        for k, role in (("kv_a_bias", "kv_a"), ("o_bias", "o"), ("q_a_bias", "q_a")):
            if k in shapes[i]:
                out[ta[role] + ".bias"] = k
        out[tn["kv_a_norm"] + ".weight"] = "kv_a_norm"
        if "q_a_norm" in shapes[i]:
            out[tn["q_a_norm"] + ".weight"] = "q_a_norm"
        for name, k in out.items():
            specs.append(TensorSpec(name, shapes[i][k], out_dtype))
            if i in built:
                own.append((name, built[i].tensors[k]))
        src_mlp, dst_mlp = view.mlp(i), target_view.mlp(i)
        for role in src_mlp:
            specs.append(TensorSpec(dst_mlp[role] + ".weight", ck.info(src_mlp[role] + ".weight").shape, out_dtype))
            copies.append((dst_mlp[role] + ".weight", src_mlp[role] + ".weight"))
        for role, p in view.layer_norms(i).items():
            dst = target_view.layer_norms(i)[role]
            specs.append(TensorSpec(dst + ".weight", ck.info(p + ".weight").shape, out_dtype))
            copies.append((dst + ".weight", p + ".weight"))
    ctx.writer.plan(specs)
    ctx.writer.set_config(out_cfg)
    for j in ctx.mine([ck.info(what or name).nbytes for name, what in copies]):  # copies split by bytes
        name, what = copies[j]
        if what is None:
            ctx.copy_tensor(name, dtype=out_dtype)
        elif ck.info(what).dtype == out_dtype:
            ctx.writer.write_bytes(name, ck.read_raw(what))
        else:
            ctx.writer.write(name, ck.get(what, dtype=out_dtype))
    for name, tensor in own:
        ctx.writer.write(name, tensor.to(out_dtype).contiguous())
    layer_metrics = [metrics_by_layer[i] for i in range(n_layers)]
    unabs = sum(math.prod(s) for by_role in shapes.values() for s in by_role.values())
    _record(
        ctx, cfg, view, target_view, out_cfg, first_layer["rank"], first_layer["d_n"], unabs, layer_metrics, d_r, rank
    )


def _kv_cache(view, dtype: torch.dtype) -> dict:
    """KV-cache values and bytes per token (all layers) from the architecture view (no eval import)."""
    values = view.kv_cache_values_per_token()
    return {
        "values_per_token": values,
        "bytes_per_token": values * element_size(dtype),
        "dtype": str(dtype).removeprefix("torch."),
        "kind": "mla" if view.is_mla else ("mha" if view.kv_heads == view.heads else "gqa"),
    }


def _record(ctx, cfg, view, target_view, out_cfg, kv_lora_rank, d_n, unabs, layer_metrics, d_r, rank):
    before = _kv_cache(view, ctx.source.info(view.family.embed).dtype)
    after = _kv_cache(target_view, out_cfg.dtype)
    n_h, H, d = view.heads, view.hidden, view.head_dim
    src_attn = view.num_layers * (H * n_h * d * 2 + H * view.kv_heads * d * 2)
    # absorbed: q → n_h·(r + d_r)·H, kv_a, o → H·n_h·r (W_O·W_UV), no kv_b
    absorbed = view.num_layers * (n_h * (kv_lora_rank + d_r) * H + (kv_lora_rank + d_r) * H + H * n_h * kv_lora_rank)
    ctx.metrics.update(
        {
            "method": cfg.method,
            "target": cfg.target,
            "kv_lora_rank": kv_lora_rank,
            "data_latent_rank": rank,
            "constant_latent_channel": cfg.target == "exact",
            "qk_rope_head_dim": d_r,
            "qk_nope_head_dim": d_n,
            "v_head_dim": d,
            "q_lora_rank": out_cfg.q_lora_rank,
            "rope_type": out_cfg.rope_parameters.get("rope_type"),
            "kv_cache_before": before,
            "kv_cache_after": after,
            "kv_cache_ratio": round(after["values_per_token"] / before["values_per_token"], 6),
            "attention_params_before": src_attn,
            "attention_params_after": unabs,
            "attention_params_absorbed": absorbed,
            "mean_attention_output_error": round(
                sum(m["attention_output_error"] for m in layer_metrics) / len(layer_metrics), 8
            ),
            "layers": layer_metrics,
        }
    )


register(
    PassSpec(
        name="mla",
        config_cls=MlaConfig,
        plan=plan,
        run=run,
        check=lambda cfg, ck: _check_source(cfg, arch_for(ck.config)),
        help="convert a GQA model (Llama, Mistral, Qwen2) to Multi-head Latent Attention as a stock "
        "DeepseekV3ForCausalLM (TransMLA / MHA2MLA)",
        reference_url="https://arxiv.org/abs/2502.07864",
        tags=("mla", "deepseek_v3"),
    )
)
