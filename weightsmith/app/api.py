"""The Python API: every pass as a function taking its config dataclass, like the CLI command.

    import weightsmith
    weightsmith.quant("HuggingFaceTB/SmolLM2-135M-Instruct", "out/w4", weightsmith.QuantConfig(bits=4, group_size=64))

Each function runs the same code as `weightsmith PASS` (freshness check, atomic output, manifest,
model card) and returns a `RunResult` (`status`, `dst`, `manifest`, `notes`). Options can be given
as the config dataclass or as keyword arguments with the config's field names (the CLI's option
names with `_` for `-`). Nothing heavy is imported until a function is called.

`weightsmith.quant`, `weightsmith.prune` and `weightsmith.merge` are also the packages holding those
passes' code; calling the package runs the pass (`make_callable`), so `weightsmith.quant(...)`
and `weightsmith.quant.gptq` both work whatever was imported first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

# public config class name -> pass name (the classes come from the pass registry on first use)
CONFIGS = {
    "ImportConfig": "import",
    "QuantConfig": "quant",
    "MlaConfig": "mla",
    "PruneConfig": "prune",
    "MinitronConfig": "minitron",
    "DistillConfig": "distill",
    "MergeConfig": "merge",
}


def config_class(pass_name: str) -> type:
    from weightsmith.app.registry import get_pass

    return get_pass(pass_name).config_cls


def _run(
    pass_name: str,
    sources: Sequence[str | Path],
    dst: str | Path | None,
    config: Any,
    options: dict[str, Any],
    *,
    force: bool,
    dry_run: bool,
    device: str,
    progress: bool,
    allow_download: bool,
):
    from weightsmith.app.cli_options import build_config
    from weightsmith.app.registry import get_pass
    from weightsmith.app.runner import run_pass
    from weightsmith.errors import UsageError
    from weightsmith.progress import QUIET, Reporter

    spec = get_pass(pass_name)
    if config is None:
        config = build_config(spec, options)
    elif options:
        raise UsageError(f"{pass_name}: give either a {spec.config_cls.__name__} or keyword options, not both")
    elif not isinstance(config, spec.config_cls):
        raise UsageError(f"{pass_name}: expected a {spec.config_cls.__name__}, got {type(config).__name__}")
    return run_pass(
        spec,
        config,
        [str(s) for s in sources],
        dst,
        force=force,
        dry_run=dry_run,
        device=device,
        allow_download=allow_download,
        report=Reporter() if progress else QUIET,
    )


def import_checkpoint(
    src, dst, config=None, *, force=False, dry_run=False, device="cpu", progress=True, allow_download=False, **options
):
    """Copy a checkpoint (directory, .gguf file, Hub id) into a verified safetensors directory
    (`weightsmith import`)."""
    return _run(
        "import",
        [src],
        dst,
        config,
        options,
        force=force,
        dry_run=dry_run,
        device=device,
        progress=progress,
        allow_download=allow_download,
    )


def quant(
    src, dst, config=None, *, force=False, dry_run=False, device="cpu", progress=True, allow_download=False, **options
):
    """RTN or GPTQ weight-only quantization (`weightsmith quant`); config: `QuantConfig`."""
    return _run(
        "quant",
        [src],
        dst,
        config,
        options,
        force=force,
        dry_run=dry_run,
        device=device,
        progress=progress,
        allow_download=allow_download,
    )


def mla(
    src, dst, config=None, *, force=False, dry_run=False, device="cpu", progress=True, allow_download=False, **options
):
    """GQA -> Multi-head Latent Attention conversion (`weightsmith mla`); config: `MlaConfig`."""
    return _run(
        "mla",
        [src],
        dst,
        config,
        options,
        force=force,
        dry_run=dry_run,
        device=device,
        progress=progress,
        allow_download=allow_download,
    )


def prune(
    src, dst, config=None, *, force=False, dry_run=False, device="cpu", progress=True, allow_download=False, **options
):
    """Structured width/depth pruning (`weightsmith prune`); config: `PruneConfig`."""
    return _run(
        "prune",
        [src],
        dst,
        config,
        options,
        force=force,
        dry_run=dry_run,
        device=device,
        progress=progress,
        allow_download=allow_download,
    )


def minitron(
    src, dst, config=None, *, force=False, dry_run=False, device="cpu", progress=True, allow_download=False, **options
):
    """Minitron architecture search under a parameter budget (`weightsmith minitron`); config: `MinitronConfig`."""
    return _run(
        "minitron",
        [src],
        dst,
        config,
        options,
        force=force,
        dry_run=dry_run,
        device=device,
        progress=progress,
        allow_download=allow_download,
    )


def distill(
    student,
    teacher,
    dst,
    config=None,
    *,
    force=False,
    dry_run=False,
    device="cpu",
    progress=True,
    allow_download=False,
    **options,
):
    """Logit-KL distillation of `student` from `teacher` (`weightsmith distill`); config: `DistillConfig`."""
    return _run(
        "distill",
        [student, teacher],
        dst,
        config,
        options,
        force=force,
        dry_run=dry_run,
        device=device,
        progress=progress,
        allow_download=allow_download,
    )


def merge(
    parents,
    dst,
    config=None,
    *,
    force=False,
    dry_run=False,
    device="cpu",
    progress=True,
    allow_download=False,
    **options,
):
    """Merge two or more parents, the first being the base (`weightsmith merge`); config: `MergeConfig`."""
    from weightsmith.errors import UsageError

    if isinstance(parents, (str, Path)) or len(parents) < 2:
        raise UsageError("merge: give a list of at least two parent checkpoints (the first is the base)")
    return _run(
        "merge",
        list(parents),
        dst,
        config,
        options,
        force=force,
        dry_run=dry_run,
        device=device,
        progress=progress,
        allow_download=allow_download,
    )


PASS_FUNCTIONS = ("import_checkpoint", "quant", "mla", "prune", "minitron", "distill", "merge")
# pass functions whose name is also a subpackage of weightsmith
PACKAGE_PASSES = ("quant", "prune", "merge")
