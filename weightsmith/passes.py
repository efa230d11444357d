"""The pass contract and its registry: one explicit dict, filled by the pass modules that
weightsmith/app/registry.py lists (the only place that knows every pass).

A pass is a frozen config dataclass + `plan(config, ctx) -> Plan` (shapes only: used by
`--dry-run` and by the writer) + `run(config, ctx, plan)` (does the work, writes through
`ctx.writer`). The CLI generates each pass's options from its dataclass fields, so the Python
API, the CLI, recipe files and the manifest's `parameters` block cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from weightsmith.errors import UsageError


@dataclass
class Plan:
    """What a pass will write: output tensors (None = decided during run), output config, a summary,
    and `state`: whatever the pass decided while planning that `run` needs (the pass's own dataclass),
    so nothing is worked out twice and nothing rides on the context."""

    tensors: list | None
    config: Any | None
    summary: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, str] | None = None  # tensor name -> shard key (see CheckpointWriter.plan)
    state: Any = None


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_cls: type
    plan: Callable[[Any, Any], Plan]
    run: Callable[[Any, Any, Plan], None]
    help: str
    reference_url: str | None = None
    relation: str | None = "finetune"  # the model card's base_model_relation (None: same model, no base_model)
    multi_source: bool = False  # any number of --parent sources (merges)
    sources: int = 1  # fixed number of positional sources (e.g. distill STUDENT TEACHER DST)
    source_names: tuple[str, ...] = ("src",)
    tags: tuple[str, ...] = ()
    # cheap refusals from a source's config alone (family, options), run before inputs are hashed or
    # anything is planned, so an unsupported model is refused at once: check(config, checkpoint)
    check: Callable[[Any, Any], None] | None = None

    def sources_problem(self, count: int) -> str | None:
        """Why `count` sources do not suit this pass (None when they do): the one check of their number."""
        if self.multi_source:
            return (
                None if count >= 2 else f"{self.name} needs at least two parents (the first is the base), got {count}"
            )
        if count != self.sources:
            return (
                f"{self.name} takes {self.sources} source(s) ({' '.join(self.source_names[: self.sources])}), got "
                f"{count}"
            )
        return None


_REGISTRY: dict[str, PassSpec] = {}


def register(spec: PassSpec) -> PassSpec:
    if spec.name in _REGISTRY:
        raise RuntimeError(f"pass {spec.name!r} registered twice")
    if not dataclasses.is_dataclass(spec.config_cls):
        raise TypeError(f"pass {spec.name!r}: config must be a dataclass")
    _REGISTRY[spec.name] = spec
    return spec


def registered() -> dict[str, PassSpec]:
    """The passes registered so far (weightsmith.app.registry imports every pass module first)."""
    return dict(_REGISTRY)


def config_to_params(config: Any) -> dict[str, Any]:
    """The fully resolved parameters (defaults included) as JSON-ready data."""

    def clean(v):
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        return v

    # fields marked runtime=True (worker counts...) never change the output: they are not
    # parameters, so changing them neither changes the manifest nor makes an output stale
    return {f.name: clean(getattr(config, f.name)) for f in dataclasses.fields(config) if not f.metadata.get("runtime")}


def check_bounds(config: Any) -> None:
    """Numeric options carry their valid range as field metadata (`min`, `max`: inclusive;
    `below`: exclusive upper bound); a value outside it is refused naming the option."""
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        lo, hi, below = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("below")
        if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if (lo is not None and v < lo) or (hi is not None and v > hi) or (below is not None and v >= below):
            rng = " and ".join(
                x
                for x in (
                    f">= {lo}" if lo is not None else "",
                    f"<= {hi}" if hi is not None else "",
                    f"< {below}" if below is not None else "",
                )
                if x
            )
            raise UsageError(f"--{f.name.replace('_', '-')} {v}: must be {rng}")


# pass name -> the function that runs it (src, dst, config), filled by the package root at import
# time (the pass packages cannot import the app that runs them)
PASS_FUNCTIONS: dict[str, Callable] = {}


def make_callable(module_name: str, pass_name: str) -> None:
    """Let the pass package `module_name` be called as its pass function (`weightsmith.quant(src, dst,
    QuantConfig(...))`): a package and the function share the name on `weightsmith`."""
    import sys
    import types

    class PassPackage(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return PASS_FUNCTIONS[pass_name](*args, **kwargs)

    sys.modules[module_name].__class__ = PassPackage
