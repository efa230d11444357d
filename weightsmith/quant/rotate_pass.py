"""`weightsmith rotate SRC DST`: fold RMSNorm scales and orthogonal rotations into the weights.

Orchestration only; the maths is in rotation.py. The output is the same function as the source
(a stock checkpoint of the same family: plain `from_pretrained`, no online transform) whose
weights are easier to quantize; `weightsmith quant --rotate` applies it on the fly before
quantizing. `RotatedCheckpoint` is a read-only view over the source that rotates each tensor as it
is read (memory: one tensor at a time plus the rotation matrices), so quant's layer-wise engine
reads the rotated model without it ever being written to disk.

Which tensor gets which treatment is decided from the architecture table's roles (READ_ROLES read
the normed residual, WRITE_ROLES add into it). A tied embedding stays tied when the final norm is
already all ones; otherwise its scale can only be folded into a separate lm_head, so the output
unties it (`tie_word_embeddings: false`, lm_head = E·diag(γ)·Q; reported in the metrics).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from functools import cached_property

import torch

from weightsmith.arch import arch_for
from weightsmith.arch.coverage import require_complete
from weightsmith.checkpoint.writer import TensorSpec
from weightsmith.errors import UnsupportedError, UsageError
from weightsmith.passes import PassSpec, Plan, register
from weightsmith.quant import rotation as rot

# roles reading the residual stream through the norm in front of their block, and the norm
READ_ROLES = {
    "q": "input",
    "k": "input",
    "v": "input",
    "q_a": "input",
    "kv_a": "input",
    "gate": "post_attention",
    "up": "post_attention",
    "router": "post_attention",
    "shared_gate": "post_attention",
}
WRITE_ROLES = ("o", "down")
ROW_CHUNK = 8192  # embedding / lm_head rows rotated at a time (bounds memory on big vocabularies)


@dataclass(frozen=True)
class RotateConfig:
    seed: int = field(default=0, metadata={"help": "seed of the random signs (and of the random orthogonal fallback)"})
    heads: bool = field(
        default=True,
        metadata={"help": "also rotate each attention head's values between v_proj and o_proj (GQA families)"},
    )


def _by_rows(t: torch.Tensor, fn) -> torch.Tensor:
    return (
        torch.cat([fn(t[i : i + ROW_CHUNK]) for i in range(0, t.shape[0], ROW_CHUNK)])
        if t.shape[0] > ROW_CHUNK
        else fn(t)
    )


class RotatedCheckpoint:
    """The source checkpoint as the rotated model: same interface for what passes and the engine read."""

    def __init__(self, ck, cfg: RotateConfig):
        self._ck = ck
        self.cfg = cfg
        view = arch_for(ck.config)
        self.view = view
        fp8 = [n for n in ck.names if ck.is_fp8(n)]
        if fp8:
            raise UsageError(
                f"{ck.root}: {fp8[0]} is fp8; rotate/quantize --rotate need floating-point weights (run `weightsmith "
                "import --dequantize-fp8` first)"
            )
        f = view.family
        extra = [n for n in ck.names if view.classify(n) in ("mtp", "other") and n != f.lm_head]
        if extra:
            raise UnsupportedError(
                f"{ck.root}: tensor {extra[0]!r} ({view.classify(extra[0])}) reads or writes the residual stream in "
                "a way rotate does not know; "
                "rotation supports the decoder layers, embedding, final norm and lm_head"
            )
        self.q, self.kind = rot.rotation(view.hidden, cfg.seed)
        final = ck.get(f.final_norm, dtype=torch.float64)
        self.untie = view.tied and not bool(torch.all(final == 1))
        self._rules: dict[str, tuple] = {f.embed: ("rows",), f.final_norm: ("ones",)}
        if self.untie or not view.tied:
            self._rules[f.lm_head] = ("reader", f.final_norm, f.embed if self.untie else f.lm_head)
        self.head_rotations = 0
        for i in range(view.num_layers):
            norms = view.layer_norms(i)
            other = sorted(set(norms) - set(READ_ROLES.values()))
            if other:  # e.g. Gemma's sandwich norms on each sublayer's output, before the residual add
                raise UnsupportedError(
                    f"{ck.root}: {norms[other[0]]} normalises a sublayer's output before the residual add "
                    f"({other[0]!r} norm of family {f.name}); a per-channel scale after that norm does not commute "
                    "with a residual rotation, so rotate cannot keep the model exact: quantize without --rotate"
                )
            for n in norms.values():
                self._rules[n + ".weight"] = ("ones",)
            r = None
            if cfg.heads and not view.is_mla:
                r, _ = rot.rotation(view.head_dim, cfg.seed + 1 + i)
                self.head_rotations += 1
            for lin in view.linears(i, include_router=True):
                w, b = lin.prefix + ".weight", lin.prefix + ".bias"
                if lin.role in READ_ROLES:
                    self._rules[w] = (
                        "reader",
                        norms[READ_ROLES[lin.role]] + ".weight",
                        w,
                        r if lin.role == "v" else None,
                    )
                    if lin.role == "v" and r is not None and b in ck:
                        self._rules[b] = ("heads_out", r)
                elif lin.role in WRITE_ROLES:
                    self._rules[w] = ("writer", r if lin.role == "o" else None)
                    if b in ck:
                        self._rules[b] = ("rows",)

    # ---- what differs from the source ------------------------------------------------------
    @cached_property
    def config(self):
        c = copy.deepcopy(self._ck.config)
        if self.untie:
            c.tie_word_embeddings = False
        return c

    @cached_property
    def config_dict(self) -> dict:
        d = copy.deepcopy(self._ck.config_dict)
        if self.untie:
            d["tie_word_embeddings"] = False
        return d

    @cached_property
    def names(self) -> list[str]:
        lm = self.view.family.lm_head
        return sorted(set(self._ck.names) | ({lm} if self.untie else set()))

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def info(self, name: str):
        if name == self.view.family.lm_head and self.untie:
            return dataclasses.replace(self._ck.info(self.view.family.embed), name=name)
        return self._ck.info(name)

    def infos(self):
        for n in self.names:
            yield self.info(n)

    def file_order(self) -> list[str]:
        order = self._ck.file_order()
        return order + [self.view.family.lm_head] if self.untie else order

    def raw_span(self, name: str):
        return None  # rotated tensors have no stored bytes to copy

    def read_raw(self, name: str) -> memoryview:
        t = self.get(name)
        return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")

    def is_fp8(self, name: str) -> bool:
        return False

    def get(self, name: str, *, dtype: torch.dtype | None = None, dequantize: bool = False) -> torch.Tensor:
        rule = self._rules.get(name)
        if rule is None:
            return self._ck.get(name, dtype=dtype, dequantize=dequantize)
        out_dtype = dtype or self.info(name).dtype
        kind = rule[0]
        if kind == "ones":
            t = torch.ones(self._ck.info(name).shape, dtype=torch.float64)
        elif kind == "rows":
            t = _by_rows(self._ck.get(name), lambda x: rot.rotate_rows(x, self.q))
        elif kind == "reader":
            _, norm, src_name, r = rule if len(rule) == 4 else (*rule, None)
            gamma = self._ck.get(norm, dtype=torch.float64)
            t = _by_rows(self._ck.get(src_name), lambda x: rot.reader(x, self.q, gamma))
            if r is not None:
                t = rot.heads_out(t, r, self.view.head_dim)
        elif kind == "heads_out":
            t = rot.heads_out(self._ck.get(name), rule[1], self.view.head_dim)
        else:  # writer
            w = self._ck.get(name)
            if rule[1] is not None:
                w = rot.heads_in(w, rule[1], self.view.head_dim)
            t = rot.writer(w, self.q)
        return t.to(out_dtype).contiguous()

    def __getattr__(self, item):  # root, origin, manifest, aux_files, fp8_block, scale_of, ...
        return getattr(self._ck, item)

    def describe(self) -> dict:
        return {
            "residual_rotation": f"{self.kind} {self.view.hidden}x{self.view.hidden}",
            "seed": self.cfg.seed,
            "head_rotations": f"{self.head_rotations} layers x {self.view.head_dim}" if self.head_rotations else "none",
            "rotated_tensors": len(self._rules),
            "untied_lm_head": self.untie,
        }


def plan(cfg: RotateConfig, ctx) -> Plan:
    ck = ctx.source
    require_complete(ck)
    if (ck.config_dict.get("quantization_config") or {}).get("quant_method") not in (None,):
        raise UsageError(f"{ck.root}: quantized checkpoints cannot be rotated; rotate the floating-point model")
    rc = RotatedCheckpoint(ck, cfg)
    tensors = [TensorSpec(i.name, tuple(i.shape), i.dtype) for i in rc.infos()]
    return Plan(tensors=tensors, config=rc.config, summary=rc.describe())


def run(cfg: RotateConfig, ctx, plan: Plan) -> None:
    rc = RotatedCheckpoint(ctx.source, cfg)
    for name in ctx.report.track(rc.file_order(), desc="rotating"):
        if name in rc._rules:
            ctx.writer.write(name, rc.get(name))
        else:
            ctx.writer.copy_from(name, ctx.source)
    ctx.metrics.update(rc.describe())
    if rc.untie:
        ctx.notes.append(
            "the tied embedding was untied: the final norm's scale can only be folded into a separate lm_head "
            "(tie_word_embeddings: false)"
        )


register(
    PassSpec(
        name="rotate",
        config_cls=RotateConfig,
        plan=plan,
        run=run,
        help="fold norm scales and randomised Hadamard rotations into the weights (same model, easier to quantize)",
        reference_url="https://arxiv.org/abs/2404.00456",
        relation=None,  # the same function as the source
    )
)
