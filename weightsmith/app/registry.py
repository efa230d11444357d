"""What the application knows that no lower layer may: the list of pass modules and of runtimes.

Importing a pass module registers its PassSpec (`weightsmith.passes.register`); the runtimes that
load quantized checkpoints are put into `weightsmith.loading.RUNTIMES` here, once, at start-up.
An import failure is reported (`unavailable()`), never swallowed.
"""

from __future__ import annotations

import importlib

from weightsmith import passes
from weightsmith.errors import UsageError

# modules that register passes
PASS_MODULES = [
    "weightsmith.importer.import_pass",
    "weightsmith.quant.quant_pass",
    "weightsmith.quant.rotate_pass",
    "weightsmith.merge.merge_pass",
    "weightsmith.prune.prune_pass",
    "weightsmith.prune.distill",
    "weightsmith.prune.minitron",
    "weightsmith.convert.mla.mla_pass",
]
# modules with RUNTIMES: {quant_method: loading.Runtime} (how to load and count their checkpoints)
RUNTIME_MODULES = ["weightsmith.quant.runtime"]

_UNAVAILABLE: dict[str, str] = {}
_LOADED: set[str] = set()


def load_runtimes() -> None:
    """Put every runtime into weightsmith.loading.RUNTIMES (idempotent; what weightsmith.load() needs)."""
    if "runtimes" in _LOADED:
        return
    from weightsmith import loading

    for mod in RUNTIME_MODULES:
        try:
            loading.RUNTIMES.update(importlib.import_module(mod).RUNTIMES)
        except ImportError as e:
            _UNAVAILABLE[mod] = loading.RUNTIME_PROBLEMS[mod] = f"{mod} is unavailable because {e}"
    _LOADED.add("runtimes")


def load() -> None:
    """Register every pass and every runtime (idempotent)."""
    load_runtimes()
    if "passes" in _LOADED:
        return
    for mod in PASS_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            _UNAVAILABLE[mod] = f"{mod} is unavailable because {e}"
    _LOADED.add("passes")


def all_passes() -> dict[str, passes.PassSpec]:
    load()
    return passes.registered()


def unavailable() -> dict[str, str]:
    load()
    return dict(_UNAVAILABLE)


def get_pass(name: str) -> passes.PassSpec:
    known = all_passes()
    if name not in known:
        raise UsageError(f"unknown pass {name!r}; available: {', '.join(sorted(known))}")
    return known[name]
