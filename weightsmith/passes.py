"""The pass registry: one explicit dict, filled by the modules listed in PASS_MODULES.

A pass is a frozen config dataclass + `plan(config, ctx) -> Plan` (shapes only: used by
`--dry-run` and by the writer) + `run(config, ctx, plan)` (does the work, writes through
`ctx.writer`). The CLI generates each pass's options from its dataclass fields, so the Python
API, the CLI, recipe files and the manifest's `parameters` block cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from weightsmith.errors import UsageError

# modules that register passes; an import failure is reported, never swallowed
PASS_MODULES = [
    "weightsmith.checkpoint.copy_pass",
    "weightsmith.quant.quant_pass",
    "weightsmith.quant.rotate_pass",
    "weightsmith.merge.merge_pass",
    "weightsmith.prune.prune_pass",
    "weightsmith.prune.distill",
    "weightsmith.prune.minitron",
    "weightsmith.convert.mla.mla_pass",
]


@dataclass
class Plan:
    """What a pass will write: output tensors (None = decided during run), output config, a summary."""

    tensors: list | None
    config: Any | None
    summary: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, str] | None = None  # tensor name -> shard key (see CheckpointWriter.plan)


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


_REGISTRY: dict[str, PassSpec] = {}
_UNAVAILABLE: dict[str, str] = {}
_LOADED = False


def register(spec: PassSpec) -> PassSpec:
    if spec.name in _REGISTRY:
        raise RuntimeError(f"pass {spec.name!r} registered twice")
    if not dataclasses.is_dataclass(spec.config_cls):
        raise TypeError(f"pass {spec.name!r}: config must be a dataclass")
    _REGISTRY[spec.name] = spec
    return spec


def load_passes() -> None:
    global _LOADED
    if _LOADED:
        return
    for mod in PASS_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            _UNAVAILABLE[mod] = f"{mod} is unavailable because {e}"
    _LOADED = True


def all_passes() -> dict[str, PassSpec]:
    load_passes()
    return dict(_REGISTRY)


def unavailable() -> dict[str, str]:
    load_passes()
    return dict(_UNAVAILABLE)


def get_pass(name: str) -> PassSpec:
    passes = all_passes()
    if name not in passes:
        raise UsageError(f"unknown pass {name!r}; available: {', '.join(sorted(passes))}")
    return passes[name]


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


def make_config(cls: type, values: dict[str, Any]) -> Any:
    """Build a pass config from a dict (recipe / CLI), refusing unknown keys (typos fail loudly)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    coerced = {}
    for k, v in values.items():
        # recipe files give lists where the dataclass wants tuples
        if isinstance(v, list) and "tuple" in str(fields[k].type):
            v = tuple(v)
        coerced[k] = v
    try:
        return cls(**coerced)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from None
