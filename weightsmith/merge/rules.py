"""Merge rules: ordered `pattern -> weights per parent`, first match wins, then the default.

A pattern is a regular expression searched in the tensor name, or `group:NAME` for a tensor group
of the architecture tables (embed, lm_head, final_norm, attention, norm, dense_mlp, router,
routed_experts, shared_experts, mtp, other). Weights are one λ per parent, or `parent:N` to take
parent N (0-based) alone. A rule may carry its own δ threshold. Written on the command line as

    --rule 'group:routed_experts=0,1'         R1T Chimera: routed experts from the second parent
    --rule 'self_attn=0.5,0.5;delta=0.02'     interpolate attention where the parents differ > 2%
    --rule 'mlp\\.gate\\.=parent:0'

and in a recipe file either the same strings or mappings {match|group, weights, delta}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from weightsmith.arch import GROUPS  # the tensor groups rules may name (ArchView.classify)
from weightsmith.errors import UsageError

_RULE = re.compile(r"(?P<pattern>.+)=(?P<weights>parent:\d+|[-+0-9.eE,\s]+)")


@dataclass(frozen=True)
class Rule:
    text: str  # as the user wrote it (for messages and the manifest)
    group: str | None
    regex: re.Pattern | None
    weights: tuple[float, ...]
    delta: float | None = None  # None: the pass-wide --delta

    def matches(self, name: str, group: str) -> bool:
        if self.group is not None:
            return group == self.group
        return bool(self.regex.search(name))

    @property
    def selects(self) -> int | None:
        """The parent index when this is a pure selection (one λ = 1, the rest 0)."""
        nz = [i for i, w in enumerate(self.weights) if w != 0]
        return nz[0] if len(nz) == 1 and self.weights[nz[0]] == 1 else None


def parse_weights(text: str, parents: int, where: str) -> tuple[float, ...]:
    text = text.strip()
    m = re.fullmatch(r"parent:(\d+)", text)
    if m:
        k = int(m.group(1))
        if k >= parents:
            raise UsageError(f"{where}: parent:{k} but there are {parents} parents (0..{parents - 1})")
        return tuple(1.0 if i == k else 0.0 for i in range(parents))
    try:
        ws = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UsageError(
            f"{where}: weights {text!r} must be numbers separated by commas (one per parent) or parent:N"
        ) from None
    if len(ws) != parents:
        raise UsageError(
            f"{where}: {len(ws)} weight(s) for {parents} parents; give one λ per parent, e.g. "
            f"{','.join(['0.5'] * parents)}"
        )
    if any(w < 0 for w in ws) or all(w == 0 for w in ws):
        raise UsageError(f"{where}: weights {text!r} must be ≥ 0 and not all zero")
    if abs(sum(ws) - 1) > 1e-6:
        raise UsageError(
            f"{where}: weights {text!r} sum to {sum(ws):g}; they must sum to 1 (Σ λ_i W_i keeps the scale of the "
            "weights)"
        )
    return ws


def parse_rule(spec: Any, parents: int, index: int) -> Rule:
    where = f"--rule #{index + 1}"
    if isinstance(spec, dict):
        unknown = set(spec) - {"match", "group", "weights", "delta"}
        if unknown or ("match" in spec) == ("group" in spec) or "weights" not in spec:
            raise UsageError(
                f"{where}: a rule mapping needs exactly one of 'match'/'group' and 'weights' (optional 'delta'), got "
                f"{sorted(spec)}"
            )
        pattern = f"group:{spec['group']}" if "group" in spec else str(spec["match"])
        w = spec["weights"]
        weights = ",".join(str(x) for x in w) if isinstance(w, (list, tuple)) else str(w)
        delta = spec.get("delta")
        text = f"{pattern}={weights}" + (f";delta={delta}" if delta is not None else "")
    else:
        text = str(spec).strip()
        body, delta = text, None
        if ";delta=" in text:
            body, _, delta = text.rpartition(";delta=")
        m = _RULE.fullmatch(body)
        if not m:
            raise UsageError(f"{where}: {text!r} must look like PATTERN=λ1,λ2[;delta=D] or group:NAME=parent:N")
        pattern, weights = m.group("pattern"), m.group("weights")
    if delta is not None:
        try:
            delta = float(delta)
        except ValueError:
            raise UsageError(f"{where}: delta {delta!r} is not a number") from None
        if delta < 0:
            raise UsageError(f"{where}: delta must be ≥ 0")
    ws = parse_weights(weights, parents, f"{where} ({text})")
    if pattern.startswith("group:"):
        g = pattern[len("group:") :]
        if g not in GROUPS:
            raise UsageError(f"{where}: unknown tensor group {g!r}; groups: {', '.join(GROUPS)}")
        return Rule(text, g, None, ws, delta)
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{where}: {pattern!r} is not a valid regular expression ({e})") from None
    return Rule(text, None, rx, ws, delta)


def resolve(rules: list[Rule], default: Rule, name: str, group: str) -> Rule:
    for r in rules:
        if r.matches(name, group):
            return r
    return default
