"""Print weightsmith's import graph between its parts (sub-packages and top-level modules).

    python scripts/import_graph.py            # part -> parts it imports (lazy imports included)
    python scripts/import_graph.py --modules  # the same, module by module

Every `import weightsmith.x` / `from weightsmith.x import y` counts, also those inside functions:
a lazy import is still a dependency. tests/test_layers.py checks these edges against the layers.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "weightsmith"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The weightsmith modules a file imports (`from a import b` counts as a.b when b is a module)."""
    return imports_of_source(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def imports_of_source(text: str, me: str, *, is_package: bool = False) -> set[str]:
    tree = ast.parse(text)
    pkg = me if is_package else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "weightsmith")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "weightsmith":
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if _exists(sub) else mod)
    out.discard(me)
    return out


def _exists(mod: str) -> bool:
    p = PKG.parent.joinpath(*mod.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def module_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PKG.rglob("*.py"))}


def part(mod: str) -> str:
    """weightsmith.quant.gptq -> quant; weightsmith.errors -> errors; weightsmith -> weightsmith."""
    bits = mod.split(".")
    return bits[1] if len(bits) > 1 else bits[0]


def part_graph() -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for mod, deps in module_graph().items():
        out[part(mod)]
        for d in deps:
            if part(d) != part(mod):
                out[part(mod)].add(part(d))
    return dict(out)


def main(argv: list[str]) -> None:
    g = module_graph() if "--modules" in argv else part_graph()
    for k in sorted(g):
        print(f"{k} -> {', '.join(sorted(g[k])) or '-'}")


if __name__ == "__main__":
    main(sys.argv[1:])
