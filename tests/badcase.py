"""Assertions shared by the bad-input and fault suites: the one-line error, no output that looks
complete, and inputs left byte-identical."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path


def tree_digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under the given paths (links followed), plus each link's target."""
    out: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                out[f"{p} ->"] = os.readlink(p)
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


PROGRESS = re.compile(r"^[\w .,'-]+\.\.\.$|^[\w .-]+: \d+(/\d+ \(\d+%\))? (done, )?.*elapsed")


def message_lines(err: str) -> list[str]:
    """stderr without the progress lines a run prints when stderr is not a terminal ("hashing inputs...",
    "layers: 3/30 (10%), 12s elapsed, ETA 1m 48s")."""
    return [line for line in err.splitlines() if line.strip() and not PROGRESS.match(line)]


def error_line(r, code: int, *patterns: str) -> str:
    """The run failed with `code` and printed exactly one `Error: ...` line matching every pattern
    (besides progress lines)."""
    assert r.code == code, r
    lines = message_lines(r.err)
    assert len(lines) == 1, r.err
    assert lines[0].startswith("Error: "), lines[0]
    assert "internal error" not in lines[0] and "Traceback" not in r.err, lines[0]
    for pat in patterns:
        assert re.search(pat, lines[0]), (pat, lines[0])
    return lines[0]


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(
        p.name for p in Path(parent).iterdir() if p.name.startswith((f".{name}.tmp", f".{name}.old", f".{name}.lock"))
    )


def no_complete_output(dst: Path) -> None:
    """Nothing at DST that looks like a finished output, and no temporaries beside it."""
    dst = Path(dst)
    assert not (dst / "manifest.json").exists(), f"{dst} looks complete"
    if dst.parent.exists():
        assert leftovers(dst.parent, dst.name) == [], leftovers(dst.parent, dst.name)
