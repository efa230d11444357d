"""Architecture knowledge as data: families, and views that answer passes' questions."""

from __future__ import annotations

from typing import Any

from weightsmith.arch.families import FAMILIES
from weightsmith.arch.spec import Family
from weightsmith.arch.view import GROUPS, ArchView, Linear, check_supported
from weightsmith.errors import UnsupportedError

__all__ = [
    "FAMILIES",
    "GROUPS",
    "ArchView",
    "Family",
    "Linear",
    "arch_for",
    "family_for",
    "supports",
    "supported_model_types",
]

_BY_TYPE = {mt: f for f in FAMILIES.values() for mt in f.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def _model_type(config: Any) -> str | None:
    return config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)


def family_for(config: Any) -> Family | None:
    return _BY_TYPE.get(_model_type(config))


def supports(config: Any) -> str | None:
    """None if weightsmith can handle this config, else the reason (naming the key at fault)."""
    mt = _model_type(config)
    fam = _BY_TYPE.get(mt)
    if fam is None:
        return f"model_type {mt!r} is not supported; supported: {', '.join(supported_model_types())}"
    return check_supported(fam, config)


def arch_for(config: Any) -> ArchView:
    reason = supports(config)
    if reason:
        raise UnsupportedError(f"unsupported architecture: {reason}")
    return ArchView(family_for(config), config)
