"""Which linears get quantized how: defaults, --override rules, groups that do not divide K."""

from __future__ import annotations

import re
from dataclasses import dataclass

from weightsmith.errors import UsageError
from weightsmith.quant.formats.base import LinearQuant

SKIPPED_GROUPS = ("router",)  # routers and gates stay in full precision (servers expect them so)
# the bit widths and group sizes weightsmith writes, in one place (the CLI's choices come from these)
BIT_CHOICES = (2, 3, 4, 8)
GROUP_CHOICES = (32, 64, 128)
GROUP_SIZES = (*GROUP_CHOICES, -1)  # -1: one group per output channel
# linears that servers run as one matmul, so they must share one bit width under --avg-bits:
# vLLM's qkv_proj, fused_qkv_a_proj (MLA) and gate_up_proj (role -> fused unit), and one FusedMoE
# per layer for all routed experts (group -> unit)
FUSED_ROLES = {"q": "qkv", "k": "qkv", "v": "qkv", "q_a": "qkv_a", "kv_a": "qkv_a", "gate": "gate_up", "up": "gate_up"}
FUSED_GROUPS = {"routed_experts": "experts"}


@dataclass(frozen=True)
class Override:
    pattern: re.Pattern
    skip: bool
    values: dict

    @classmethod
    def parse(cls, text: str) -> Override:
        pat, sep, rest = text.rpartition(":")
        if not sep or not pat:
            raise UsageError(f"--override {text!r}: write REGEX:skip or REGEX:bits=3,group_size=64,sym=false")
        try:
            regex = re.compile(pat)
        except re.error as e:
            raise UsageError(f"--override {text!r}: bad regular expression ({e})") from None
        if rest.strip() == "skip":
            return cls(regex, True, {})
        values = {}
        for item in rest.split(","):
            key, eq, val = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in ("bits", "group_size", "sym"):
                raise UsageError(f"--override {text!r}: unknown setting {item!r}; use bits=, group_size=, sym= or skip")
            if key == "sym":
                values[key] = val.strip().lower() in ("1", "true", "yes", "sym")
            else:
                try:
                    values[key] = int(val)
                except ValueError:
                    raise UsageError(f"--override {text!r}: {key} must be an integer") from None
        if values.get("bits", BIT_CHOICES[0]) not in BIT_CHOICES:
            raise UsageError(f"--override {text!r}: bits must be one of {', '.join(map(str, BIT_CHOICES))}")
        if values.get("group_size", GROUP_CHOICES[0]) not in GROUP_SIZES:
            raise UsageError(f"--override {text!r}: group_size must be one of {', '.join(map(str, GROUP_SIZES))}")
        return cls(regex, False, values)


@dataclass
class Decision:
    quant: LinearQuant | None  # None: left in full precision
    note: str | None = None  # e.g. "group 128 -> 64 (576 not divisible)"


def divisors_in_choices(k: int) -> list[int]:
    return [g for g in GROUP_CHOICES if k % g == 0]


def decide(
    prefix: str, group: str, in_features: int, default: LinearQuant, overrides: list[Override], mismatch: str, fmt
) -> Decision:
    if group in SKIPPED_GROUPS:
        quant, note = None, "router: kept in full precision"
    else:
        quant, note = default, None
        for ov in overrides:
            if ov.pattern.search(prefix):
                if ov.skip:
                    return Decision(None, f"skipped by --override {ov.pattern.pattern!r}")
                quant = LinearQuant(
                    ov.values.get("bits", default.bits),
                    ov.values.get("group_size", default.group_size),
                    ov.values.get("sym", default.sym),
                )
                note = f"--override {ov.pattern.pattern!r}"
                break
    if quant is None:
        return Decision(None, note)
    g = quant.group_size
    if g != -1 and in_features % g:
        valid = divisors_in_choices(in_features)
        if mismatch == "error" or (mismatch == "ragged" and not fmt.allows_ragged_groups):
            why = "" if mismatch == "error" else f" (the {fmt.name} format cannot store ragged groups)"
            raise UsageError(
                f"{prefix}: group size {g} does not divide in_features {in_features}{why}; valid group sizes here: "
                f"{', '.join(map(str, valid + [-1]))} (or --group-mismatch fallback / ragged)"
            )
        if mismatch == "fallback":
            smaller = [v for v in valid if v < g]
            new = max(smaller) if smaller else -1
            quant = LinearQuant(quant.bits, new, quant.sym)
            note = f"group {g} -> {'per-channel' if new == -1 else new}: {g} does not divide {in_features}"
        else:
            note = (
                f"ragged last group: {in_features} = {in_features // g} x {g} + {in_features % g} (g_idx = column "
                f"// {g})"
            )
    return Decision(quant, note)


def fused_unit(lin, layer: int | None) -> str:
    """The name of the set of linears `lin` must share a bit width with (itself alone if none)."""
    if lin.group in FUSED_GROUPS:
        return f"layer {layer} {FUSED_GROUPS[lin.group]}"
    if lin.role in FUSED_ROLES:
        return f"{lin.prefix.rsplit('.', 1)[0]}.<{FUSED_ROLES[lin.role]}>"
    return lin.prefix
