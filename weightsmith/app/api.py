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
    config: Any = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    device: str = "cpu",
    progress: bool = True,
    allow_download: bool = False,
    **options: Any,
):
    """Run one pass like its CLI command. `config` is the pass's config dataclass, or None and the
    config's fields as keyword `options`; `force`, `dry_run`, `device`, `progress` and
    `allow_download` are the run options every pass function takes (keyword only)."""
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


RUN_OPTIONS = "Keyword options: force, dry_run, device, progress, allow_download, or the config's fields."


def _one_source(pass_name: str, fn_name: str, doc: str):
    """The pass function of a single-source pass: fn(src, dst, config=None, **options)."""

    def fn(src, dst, config=None, **kwargs):
        return _run(pass_name, [src], dst, config, **kwargs)

    fn.__name__ = fn.__qualname__ = fn_name
    fn.__doc__ = f"{doc}\n\n{RUN_OPTIONS}"
    return fn


import_checkpoint = _one_source(
    "import",
    "import_checkpoint",
    "Copy a checkpoint (directory, .gguf file, Hub id) into a verified safetensors directory (`weightsmith import`).",
)
quant = _one_source(
    "quant", "quant", "RTN or GPTQ weight-only quantization (`weightsmith quant`); config: `QuantConfig`."
)
mla = _one_source(
    "mla", "mla", "GQA -> Multi-head Latent Attention conversion (`weightsmith mla`); config: `MlaConfig`."
)
prune = _one_source("prune", "prune", "Structured width/depth pruning (`weightsmith prune`); config: `PruneConfig`.")
minitron = _one_source(
    "minitron",
    "minitron",
    "Minitron architecture search under a parameter budget (`weightsmith minitron`); config: `MinitronConfig`.",
)


def distill(student, teacher, dst, config=None, **kwargs):
    """Logit-KL distillation of `student` from `teacher` (`weightsmith distill`); config: `DistillConfig`.

    Keyword options: force, dry_run, device, progress, allow_download, or the config's fields."""
    return _run("distill", [student, teacher], dst, config, **kwargs)


def merge(parents, dst, config=None, **kwargs):
    """Merge two or more parents, the first being the base (`weightsmith merge`); config: `MergeConfig`.

    Keyword options: force, dry_run, device, progress, allow_download, or the config's fields."""
    from weightsmith.errors import UsageError

    if isinstance(parents, (str, Path)) or len(parents) < 2:
        raise UsageError("merge: give a list of at least two parent checkpoints (the first is the base)")
    return _run("merge", list(parents), dst, config, **kwargs)


PASS_FUNCTIONS = ("import_checkpoint", "quant", "mla", "prune", "minitron", "distill", "merge")
# pass functions whose name is also a subpackage of weightsmith
PACKAGE_PASSES = ("quant", "prune", "merge")
