"""`weightsmith merge DST --parent BASE --parent B [...]`: Chimera / Assembly-of-Experts merges.

Per tensor, the first matching rule gives one λ per parent: λ = (0,..,1,..,0) selects that
parent's bytes untouched (fp8 weight and its scales together); anything else interpolates
W = Σ λ_i W_i in fp32, after dequantizing fp8 parents with their own block scales, and
requantizes to the same 128x128 block format (or writes --out-dtype). With a threshold δ a tensor
is interpolated only where some parent differs from the base by more than δ (relative Frobenius
norm); otherwise the base's bytes are copied. Everything is checked before a byte is written;
tensors stream in the base's on-disk order through a small worker pool, only the parents a tensor
needs are read, and the output keeps the base's sharding.
"""

from __future__ import annotations

import copy
import math
import os
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal

import torch

from weightsmith import dist
from weightsmith.arch import arch_for
from weightsmith.arch.spec import SCALE_SUFFIX
from weightsmith.checkpoint import tokenizer
from weightsmith.checkpoint.fp8 import dequantize_blockwise
from weightsmith.checkpoint.writer import TensorSpec
from weightsmith.errors import CheckpointError, UsageError
from weightsmith.merge import stream
from weightsmith.merge.maths import interpolate_into, merge_fp8, square_sums
from weightsmith.merge.rules import Rule, parse_rule, parse_weights, resolve
from weightsmith.passes import PassSpec, Plan, register
from weightsmith.util import FLOAT_DTYPES, FP8_DTYPES, dtype_from_name, dtype_name, element_size

# config keys that make two checkpoints different architectures (shapes are checked per tensor)
STRUCTURAL_KEYS = (
    "model_type",
    "architectures",
    "num_hidden_layers",
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "num_experts",
    "num_local_experts",
    "first_k_dense_replace",
    "kv_lora_rank",
    "q_lora_rank",
    "head_dim",
    "tie_word_embeddings",
)


@dataclass(frozen=True)
class MergeConfig:
    weights: str | None = field(
        default=None,
        metadata={"help": "default rule: one λ per parent (e.g. 0.7,0.3) or parent:N; default: equal weights"},
    )
    rule: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "PATTERN=λ1,λ2[;delta=D] or group:NAME=parent:N (repeat; first match wins; PATTERN is a regex "
            "searched in the tensor name)"
        },
    )
    delta: float = field(
        default=0.0,
        metadata={
            "help": "interpolate a tensor only where a parent differs from the base by more than this (relative "
            "Frobenius norm); else copy the base"
        },
    )
    out_dtype: Literal["keep", "bfloat16", "float16", "float32"] = field(
        default="keep",
        metadata={
            "help": "keep the parents' dtypes (fp8 stays block-scaled fp8) or write this dtype (fp8 dequantized)"
        },
    )
    ue8m0: bool = field(
        default=False,
        metadata={"help": "round requantized fp8 scales to powers of two (DeepSeek V3.1 scale_fmt ue8m0)"},
    )
    tokenizer_from: int | None = field(
        default=None,
        metadata={"help": "take the tokenizer files from this parent (0-based) when the parents' tokenizers differ"},
    )
    partial: Literal["error", "base", "first"] = field(
        default="error",
        metadata={
            "help": "a tensor only some parents have: error, take the base's (drop it if the base lacks it: never), or "
            "take it from the first parent that has it"
        },
    )
    workers: int = field(
        default=0,
        metadata={
            "help": "parallel tensor workers (0: one per core, at most 8); the output does not depend on it",
            "runtime": True,
        },
    )


@dataclass
class Unit:
    """One output tensor with its fp8 scale (if any), and how to make it."""

    name: str
    group: str
    rule: Rule
    scale: str | None  # base's scale tensor name when the weight is block-scaled fp8
    out_dtype: torch.dtype
    have: tuple[int, ...]  # parents that hold this tensor
    action: str = ""  # select | interpolate


def _parents_config_check(cks) -> list[str]:
    base = cks[0].config_dict
    notes = []
    for k, ck in enumerate(cks[1:], 1):
        other = ck.config_dict
        for key in STRUCTURAL_KEYS:
            if base.get(key) != other.get(key):
                raise CheckpointError(
                    f"parent {k} ({ck.root}) is a different architecture: {key} = {other.get(key)!r}, the base has "
                    f"{base.get(key)!r}"
                )
        differ = sorted(
            kk
            for kk in set(base) | set(other)
            if kk not in ("_name_or_path", "transformers_version") and base.get(kk) != other.get(kk)
        )
        if differ:
            notes.append(
                f"parent {k}'s config differs from the base in "
                f"{', '.join(differ[:6])}{'…' if len(differ) > 6 else ''}: the base's config is kept"
            )
    return notes


def _check_tokenizers(cfg: MergeConfig, cks) -> int:
    """Index of the parent whose tokenizer files go to the output."""
    if cfg.tokenizer_from is not None:
        if not 0 <= cfg.tokenizer_from < len(cks):
            raise UsageError(f"--tokenizer-from {cfg.tokenizer_from}: there are {len(cks)} parents (0..{len(cks) - 1})")
        return cfg.tokenizer_from
    digests = [tokenizer.digest(ck.root) for ck in cks]
    for k, d in enumerate(digests[1:], 1):
        differ = tokenizer.differences(digests[0], d)
        if differ:
            raise CheckpointError(
                f"parent {k} ({cks[k].root}) has a different tokenizer than the base ({', '.join(differ)} differ); "
                f"merged weights index the vocabulary, so choose one explicitly with --tokenizer-from N"
            )
    return 0


def _units(cfg: MergeConfig, ctx) -> tuple[list[Unit], list[Rule], Rule]:
    cks = ctx.sources
    n = len(cks)
    view = arch_for(cks[0].config)
    rules = [parse_rule(r, n, i) for i, r in enumerate(cfg.rule)]
    default_w = parse_weights(cfg.weights, n, "--weights") if cfg.weights else tuple(1.0 / n for _ in range(n))
    default = Rule(f"default={cfg.weights or ','.join(f'{w:g}' for w in default_w)}", None, None, default_w, None)
    names: dict[str, list[int]] = {}
    for k, ck in enumerate(cks):
        for nm in ck.names:
            if nm.endswith(SCALE_SUFFIX):
                continue
            names.setdefault(nm, []).append(k)
    want_dtype = None if cfg.out_dtype == "keep" else dtype_from_name(cfg.out_dtype)
    units, used = [], set()
    for nm, have in names.items():
        if len(have) != n:
            missing = [k for k in range(n) if k not in have]
            if cfg.partial == "error":
                raise CheckpointError(
                    f"tensor {nm!r} is missing from parent(s) {', '.join(map(str, missing))}; "
                    f"say how to treat tensors only some parents have with --partial base|first"
                )
            if cfg.partial == "base" and 0 not in have:
                raise CheckpointError(
                    f"tensor {nm!r} is not in the base parent (--partial base); use --partial first to take it from "
                    f"parent {have[0]}"
                )
        infos = [cks[k].info(nm) for k in have]
        for k, inf in zip(have, infos):
            if inf.shape != infos[0].shape:
                raise CheckpointError(
                    f"tensor {nm!r}: parent {k} has shape {list(inf.shape)}, parent {have[0]} has "
                    f"{list(infos[0].shape)}"
                )
            if inf.dtype != infos[0].dtype:
                raise CheckpointError(
                    f"tensor {nm!r}: parent {k} is {dtype_name(inf.dtype)}, parent {have[0]} is "
                    f"{dtype_name(infos[0].dtype)}; "
                    f"bring them to one dtype first (e.g. weightsmith import --dequantize-fp8)"
                )
        group = view.classify(nm)
        rule = resolve(rules, default, nm, group)
        used.add(rule.text)
        if len(have) != n:  # partial tensors are selected from one parent
            src = 0 if cfg.partial == "base" else have[0]
            rule = Rule(f"partial:{cfg.partial}", None, None, tuple(1.0 if i == src else 0.0 for i in range(n)), None)
        dt = infos[0].dtype
        scale = cks[have[0]].scale_of(nm) if dt in FP8_DTYPES else None
        if dt in FP8_DTYPES and scale is None:
            raise CheckpointError(
                f"tensor {nm!r} is fp8 without a {nm + SCALE_SUFFIX!r} block scale; only DeepSeek-style block-scaled "
                "fp8 can be merged"
            )
        if scale is not None:
            for k in have:
                if (
                    cks[k].scale_of(nm) is None
                    or cks[k].info(cks[k].scale_of(nm)).shape != cks[have[0]].info(scale).shape
                ):
                    raise CheckpointError(f"tensor {nm!r}: parent {k} lacks a matching {scale!r}")
        out_dt = dt
        if want_dtype is not None and (dt in FLOAT_DTYPES or dt in FP8_DTYPES):
            out_dt = want_dtype
        units.append(Unit(nm, group, rule, scale, out_dt, tuple(have)))
    unused = [r.text for r in rules if r.text not in used]
    if unused:
        groups = sorted({u.group for u in units})
        raise UsageError(
            f"rule {unused[0]!r} matches no tensor (groups present: {', '.join(groups)}); fix or remove it"
        )
    for u in units:
        sel = u.rule.selects
        u.action = "select" if sel is not None else "interpolate"
        dt = cks[u.have[0]].info(u.name).dtype
        if u.action == "interpolate" and not (dt in FLOAT_DTYPES or dt in FP8_DTYPES):
            raise UsageError(
                f"tensor {u.name!r} is {dtype_name(dt)} and cannot be interpolated (rule {u.rule.text!r}); "
                f"select it from one parent with a rule before this one, e.g. --rule '{re.escape(u.name)}=parent:0'"
            )
    return units, rules, default


@dataclass(frozen=True)
class MergePlan:
    """What plan() decided for run(): one unit per output tensor, and the parent giving the tokenizer."""

    units: list  # [Unit]
    tokenizer_from: int


def plan(cfg: MergeConfig, ctx) -> Plan:
    cks = ctx.sources
    if cfg.delta < 0:
        raise UsageError(f"--delta {cfg.delta}: must be ≥ 0")
    if cfg.workers < 0:
        raise UsageError(f"--workers {cfg.workers}: must be ≥ 0")
    arch_for(cks[0].config)
    ctx.notes.extend(_parents_config_check(cks))
    tok_from = _check_tokenizers(cfg, cks)
    units, rules, default = _units(cfg, ctx)
    tensors, layout = [], {}
    keep_layout = cfg.out_dtype == "keep"
    for u in units:
        src = cks[0] if 0 in u.have else cks[u.have[0]]
        tensors.append(TensorSpec(u.name, src.info(u.name).shape, u.out_dtype))
        if keep_layout:
            layout[u.name] = src.info(u.name).file
        if u.scale is not None and u.out_dtype in FP8_DTYPES:
            tensors.append(TensorSpec(u.scale, src.info(u.scale).shape, src.info(u.scale).dtype))
            if keep_layout:
                layout[u.scale] = src.info(u.scale).file
    out_cfg = copy.deepcopy(cks[0].config)
    if cfg.out_dtype != "keep":
        if hasattr(out_cfg, "quantization_config"):
            del out_cfg.quantization_config
        out_cfg.dtype = dtype_from_name(cfg.out_dtype)
    groups: dict[str, dict] = {}
    for u in units:
        g = groups.setdefault(u.group, {"tensors": 0, "rules": {}})
        g["tensors"] += 1
        g["rules"][u.rule.text] = g["rules"].get(u.rule.text, 0) + 1
    by_rule = {u.rule.text: u.rule for u in units}
    for gname, g in groups.items():
        for text, count in g["rules"].items():
            ctx.notes.append(
                f"plan: {gname}: {count} tensor(s) {_describe(by_rule[text], cfg.delta, cfg.out_dtype)}  [{text}]"
            )
    reads = [0] * len(cks)
    for u in units:
        for k in u.have:
            if u.rule.weights[k] != 0 or (u.action == "interpolate" and _delta(cfg, u) > 0 and k == 0):
                reads[k] += cks[k].info(u.name).nbytes + (cks[k].info(u.scale).nbytes if u.scale else 0)
    summary = {
        "parents": [str(ck.root) for ck in cks],
        "groups": groups,
        "select": sum(u.action == "select" for u in units),
        "interpolate": sum(u.action == "interpolate" for u in units),
        "delta": cfg.delta,
        "tokenizer_from": tok_from,
        "bytes_to_read_per_parent": reads,
    }
    return Plan(
        tensors=tensors, config=out_cfg, summary=summary, layout=layout or None, state=MergePlan(units, tok_from)
    )


def _describe(rule: Rule, delta: float, out_dtype: str) -> str:
    if rule.selects is not None:
        return f"from parent {rule.selects} " + ("(bytes copied)" if out_dtype == "keep" else f"(as {out_dtype})")
    d = rule.delta if rule.delta is not None else delta
    mix = " + ".join(f"{w:g}·parent {k}" for k, w in enumerate(rule.weights) if w)
    return f"= {mix}" + (f" where a parent differs from the base by > δ={d:g}, else from parent 0" if d > 0 else "")


class _Stats:
    def __init__(self, n: int):
        self.lock = threading.Lock()
        self.groups: dict[str, dict] = {}
        self.read = [0] * n

    def count(self, group: str, key: str, diff: float | None = None) -> None:
        with self.lock:
            g = self.groups.setdefault(group, {"selected": {}, "interpolated": 0, "copied_below_delta": 0})
            if key.startswith("selected:"):
                p = key.split(":")[1]
                g["selected"][p] = g["selected"].get(p, 0) + 1
            else:
                g[key] += 1
            if diff is not None:
                g["max_relative_difference"] = max(g.get("max_relative_difference", 0.0), diff)

    def add_read(self, k: int, nbytes: int) -> None:
        with self.lock:
            self.read[k] += nbytes

    def combine(self, parts: list[tuple[dict, list[int]]]) -> None:
        """Every rank's counts (in rank order): sums, and the max of the relative differences."""
        groups: dict[str, dict] = {}
        read = [0] * len(self.read)
        for part_groups, part_read in parts:
            read = [a + b for a, b in zip(read, part_read)]
            for name, g in part_groups.items():
                out = groups.setdefault(name, {"selected": {}, "interpolated": 0, "copied_below_delta": 0})
                for p, c in g["selected"].items():
                    out["selected"][p] = out["selected"].get(p, 0) + c
                out["interpolated"] += g["interpolated"]
                out["copied_below_delta"] += g["copied_below_delta"]
                if "max_relative_difference" in g:
                    out["max_relative_difference"] = max(
                        out.get("max_relative_difference", 0.0), g["max_relative_difference"]
                    )
        self.groups, self.read = groups, read


def _unit_bytes(cks, u: Unit) -> int:
    """Bytes a unit reads (every parent that has it): the cost that balances ranks."""
    return sum(cks[k].info(u.name).nbytes for k in u.have)


def _delta(cfg: MergeConfig, u: Unit) -> float:
    return u.rule.delta if u.rule.delta is not None else cfg.delta


def _parts(cks, u: Unit) -> list[stream.Part]:
    k = u.have[0]
    info = cks[k].info(u.name)
    return stream.parts_of(tuple(info.shape), info.dtype, fp8_block=cks[k].fp8_block if u.scale is not None else None)


def _tasks(cfg: MergeConfig, cks, units: list[Unit]):
    """(function, args) per unit of work, in the given order: whole-tensor kernel copies for
    selections, one task per part for interpolations (and casts), one task per δ-gated tensor
    (its decision needs the whole tensor's difference first)."""
    for u in units:
        if u.action == "select" and cks[u.rule.selects].info(u.name).dtype == u.out_dtype:
            yield _copy_unit, (cks, u, u.rule.selects, f"selected:{u.rule.selects}", None)
        elif u.action == "interpolate" and _delta(cfg, u) > 0:
            yield _gated_unit, (cfg, cks, u)
        else:
            lam = u.rule.weights
            key = "interpolated" if u.action == "interpolate" else f"selected:{u.rule.selects}"
            for part in _parts(cks, u):
                yield _merge_part, (cfg, cks, u, lam, part, key)


def _copy_unit(cks, u: Unit, k: int, key: str, diff: float | None, *, w, stats: _Stats) -> None:
    """Parent k's tensor (and fp8 scale) byte for byte, copied in the kernel."""
    ck = cks[k]
    w.copy_from(u.name, ck)
    stats.add_read(k, ck.info(u.name).nbytes)
    if u.scale is not None:
        w.copy_from(u.scale, ck, ck.scale_of(u.name))
        stats.add_read(k, ck.info(ck.scale_of(u.name)).nbytes)
    stats.count(u.group, key, diff)


def _read_values(cks, u: Unit, k: int, part: stream.Part, slot: str):
    """Parent k's part as stored: a flat tensor, or (fp8 rows, their block scales) for block-scaled fp8."""
    ck = cks[k]
    info = ck.info(u.name)
    raw = stream.read_part(ck, u.name, part.start, part.stop, f"{slot}{k}")
    if u.scale is None:
        return stream.typed(raw, info.dtype)
    (r0, r1), (b0, b1) = part.rows, part.block_rows
    sname = ck.scale_of(u.name)
    sinfo = ck.info(sname)
    srow = sinfo.shape[1] * element_size(sinfo.dtype)
    sc = stream.typed(
        stream.read_part(ck, sname, b0 * srow, b1 * srow, f"{slot}s{k}"), sinfo.dtype, (b1 - b0, sinfo.shape[1])
    )
    return stream.typed(raw, info.dtype, (r1 - r0, info.shape[1])), sc


def _merge_part(cfg: MergeConfig, cks, u: Unit, lam, part: stream.Part, key: str, *, w, stats: _Stats) -> None:
    """One part of Σ λ_i W_i (a one-hot λ with a cast is a selection that changes dtype)."""
    need = [k for k in range(len(cks)) if lam[k] != 0]
    vals = {k: _read_values(cks, u, k, part, "in") for k in need}
    for k in need:
        stats.add_read(
            k, part.stop - part.start + (vals[k][1].numel() * vals[k][1].element_size() if u.scale is not None else 0)
        )
    if u.scale is not None:
        requant = u.out_dtype in FP8_DTYPES
        q, s = merge_fp8(
            [vals[k][0] if k in vals else None for k in range(len(cks))],
            [vals[k][1] if k in vals else None for k in range(len(cks))],
            list(lam),
            cks[need[0]].fp8_block,
            requantize=requant,
            ue8m0=cfg.ue8m0,
            out_dtype=u.out_dtype,
        )
        (r0, _r1), (b0, _b1) = part.rows, part.block_rows
        w.write_range(u.name, r0 * q.shape[1] * q.element_size(), q)
        if s is not None:
            sdt = cks[need[0]].info(u.scale).dtype
            w.write_range(u.scale, b0 * s.shape[1] * s.element_size(), s.to(sdt))
    else:
        ref = vals[need[0]]
        if not ref.is_floating_point():
            raise CheckpointError(
                f"cannot interpolate {u.name!r} ({dtype_name(ref.dtype)}); select it from one parent with a rule "
                "(…=parent:N)"
            )
        out = stream.out_buffer(u.out_dtype, ref.numel())
        interpolate_into([vals.get(k) for k in range(len(cks))], lam, out)
        w.write_range(u.name, part.start // ref.element_size() * out.element_size(), out)
    if part.index == 0:
        stats.count(u.group, key)


def _gated_unit(cfg: MergeConfig, cks, u: Unit, *, w, stats: _Stats) -> None:
    """Assembly-of-Experts δ gate: ‖W_k − W_base‖/‖W_base‖ over the whole tensor (part by part),
    then either the base's bytes or the interpolation."""
    lam = u.rule.weights
    others = [k for k in range(1, len(cks)) if lam[k] != 0]
    parts = _parts(cks, u)
    num: dict[int, list[float]] = {k: [] for k in others}
    den: list[float] = []
    for part in parts:

        def value(k):
            v = _read_values(cks, u, k, part, "gate" if k else "base")
            return dequantize_blockwise(v[0], v[1], cks[k].fp8_block) if u.scale is not None else v

        base = value(0)
        den += square_sums(base, stream.REDUCE_ELEMS)
        for k in others:
            num[k] += square_sums(value(k).double() - base.double(), stream.REDUCE_ELEMS)
    for k in [0, *others]:
        stats.add_read(
            k, cks[k].info(u.name).nbytes + (cks[k].info(cks[k].scale_of(u.name)).nbytes if u.scale is not None else 0)
        )
    diff = max((_ratio(math.fsum(num[k]), math.fsum(den)) for k in others), default=0.0)
    if diff <= _delta(cfg, u):
        if cks[0].info(u.name).dtype == u.out_dtype:
            _copy_unit(cks, u, 0, "copied_below_delta", diff, w=w, stats=stats)
        else:
            for part in parts:
                _merge_part(
                    cfg,
                    cks,
                    u,
                    tuple(1.0 if i == 0 else 0.0 for i in range(len(cks))),
                    part,
                    "copied_below_delta",
                    w=w,
                    stats=_NoCount(stats),
                )
            stats.count(u.group, "copied_below_delta", diff)
        return
    for part in parts:
        _merge_part(cfg, cks, u, lam, part, "interpolated", w=w, stats=_NoCount(stats))
    stats.count(u.group, "interpolated", diff)


class _NoCount:
    """Stats view for parts run inside a gated unit: reads counted, the unit counted once by it."""

    def __init__(self, stats: _Stats):
        self.stats = stats

    def add_read(self, k: int, nbytes: int) -> None:
        self.stats.add_read(k, nbytes)

    def count(self, *a, **kw) -> None:
        pass


def _ratio(num2: float, den2: float) -> float:
    if den2 == 0:
        return 0.0 if num2 == 0 else float("inf")
    return (num2 / den2) ** 0.5


def run(cfg: MergeConfig, ctx, plan: Plan) -> None:
    cks = ctx.sources
    units: list[Unit] = plan.state.units
    by_name = {u.name: u for u in units}
    order = [nm for nm in cks[0].file_order() if nm in by_name] + [u.name for u in units if 0 not in u.have]
    total = len(order)
    if ctx.world.distributed:  # each rank reads and writes its share of the tensors, balanced by bytes read
        order = [order[j] for j in ctx.mine([_unit_bytes(cks, by_name[nm]) for nm in order])]
    workers = cfg.workers or min(8, os.cpu_count() or 1)
    stats = _Stats(len(cks))
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="merge") as pool:
            pending = set()
            for fn, args in _tasks(cfg, cks, ctx.report.track([by_name[nm] for nm in order], desc="merging")):
                if len(pending) >= 2 * workers:  # bounded read-ahead: memory stays a few parts per worker
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(fn, *args, w=ctx.writer, stats=stats))
            for f in pending:
                f.result()
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - t0
    if ctx.world.distributed:
        stats.combine(dist.gather_objects((stats.groups, stats.read)))
    # the streaming rate, startup and hashing excluded (reported, not stored: outputs stay byte-identical)
    ctx.notes.append(
        f"merged {len(order)} tensors in {seconds:.2f} s"
        + (f" (this rank's share of {total})" if ctx.world.distributed else "")
        + f": read {sum(stats.read) / 1e6:,.0f} MB "
        f"({sum(stats.read) / 1e6 / max(seconds, 1e-9):,.0f} MB/s)"
    )
    # tokenizer & co.: from the chosen parent; other aux files (generation config...) from the base
    ctx.copy_aux = False
    tok = cks[plan.state.tokenizer_from]
    aux = set(cks[0].aux_files())
    tok_files = [f for f in tok.aux_files() if f in tokenizer.TOKENIZER_FILES]
    ctx.writer.copy_aux_files(tok.root, tok_files)
    ctx.writer.copy_aux_files(cks[0].root, sorted(f for f in aux if f not in tokenizer.TOKENIZER_FILES))
    out_names = {s.name for s in ctx.writer.planned}
    dropped = [
        nm
        for ck in cks
        for nm in ck.names
        if nm not in out_names and not (cfg.out_dtype != "keep" and nm.endswith(SCALE_SUFFIX))
    ]
    if dropped:  # the plan covers every tensor; this guards the invariant
        raise CheckpointError(f"internal error: input tensor {dropped[0]!r} has no place in the output")
    ctx.metrics.update(
        {
            "parents": len(cks),
            "groups": stats.groups,
            "bytes_read_per_parent": stats.read,
            "delta": cfg.delta,
            "rules": [r for r in cfg.rule],
            "default_weights": cfg.weights or "equal",
            "tokenizer_from": plan.state.tokenizer_from,
            "input_tensors_accounted": sum(len(ck.names) for ck in cks),
        }
    )


register(
    PassSpec(
        name="merge",
        config_cls=MergeConfig,
        plan=plan,
        run=run,
        help="Chimera / Assembly-of-Experts merge: per-tensor selection or interpolation of parents (fp8 block scales "
        "handled)",
        reference_url="https://arxiv.org/abs/2506.14794",
        relation="merge",
        multi_source=True,
        tags=("merge", "chimera"),
    )
)
