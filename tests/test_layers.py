"""The import graph points one way: a lower layer never imports a higher one (lazy imports count).

The layers, lowest first, are those of docs/architecture.md; scripts/import_graph.py prints the graph.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import import_graph  # noqa: E402

# part of the package -> layer (lowest first), as in docs/architecture.md. Parts of one layer may
# import each other, except passes.
LAYERS: dict[str, int] = {
    # leaves: exceptions, the version, helpers, progress, the embedded assets
    "errors": 0,
    "version": 0,
    "util": 0,
    "progress": 0,
    "assets": 0,
    "dist": 0,
    # the core: architecture data, then checkpoints on disk
    "arch": 1,
    "checkpoint": 2,
    # the machinery passes build on
    "kernels": 3,
    "engine": 3,
    "calib": 3,
    "loading": 3,
    "eval": 3,
    "fsdp": 3,
    # the pass contract, then the passes (which never import each other)
    "passes": 4,
    "importer": 5,
    "quant": 5,
    "merge": 5,
    "prune": 5,
    "convert": 5,
    # the application: the only code that knows every pass; the package root is its public face
    "app": 6,
    "weightsmith": 6,
    "__main__": 6,
}
PASS_LAYER = 5


def _violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        me = import_graph.part(mod)
        for dep in sorted(deps):
            other = import_graph.part(dep)
            if other == me:
                continue
            if LAYERS[other] > LAYERS[me] or (LAYERS[other] == LAYERS[me] == PASS_LAYER):
                bad.append(f"{mod} imports {dep} ({me} is layer {LAYERS[me]}, {other} is layer {LAYERS[other]})")
    return bad


def test_every_part_has_a_layer():
    parts = {import_graph.part(m) for m in import_graph.module_graph()}
    assert parts <= set(LAYERS), (
        f"new part(s) {sorted(parts - set(LAYERS))}: give them a layer here and in docs/architecture.md"
    )


def test_no_lower_layer_imports_a_higher_one():
    bad = _violations(import_graph.module_graph())
    assert not bad, "\n".join(bad)


def test_the_check_sees_upward_and_lazy_imports(tmp_path):
    # the walker must see an import inside a function, and the check must flag it
    f = tmp_path / "lazy.py"
    f.write_text("def f():\n    from weightsmith.app.runner import run_pass\n")
    assert import_graph.imports_of_source(f.read_text(), "weightsmith.checkpoint.lazy") == {"weightsmith.app.runner"}
    assert _violations({"weightsmith.checkpoint.lazy": {"weightsmith.app.runner"}})
    assert _violations({"weightsmith.quant.x": {"weightsmith.prune.y"}})  # passes never import each other
    assert not _violations({"weightsmith.quant.x": {"weightsmith.kernels.y"}})
