"""weightsmith: turn Hugging Face LLM checkpoints into efficient variants, offline.

Importing the package is lean (no torch, no transformers, no CUDA initialisation): the pass
functions and their config classes load on first use.

    import weightsmith
    weightsmith.quant("path/to/model", "out/w4", weightsmith.QuantConfig(method="rtn", bits=4))
    model = weightsmith.load("out/w4")  # a ready transformers model

Pass functions (see `weightsmith.app.api`): import_checkpoint, quant, mla, prune, minitron, distill,
merge. Config classes: ImportConfig, QuantConfig, MlaConfig, PruneConfig, MinitronConfig,
DistillConfig, MergeConfig.
"""

from weightsmith import passes as _passes
from weightsmith.version import __version__

__all__ = [
    "__version__",
    "load",
    "import_checkpoint",
    "quant",
    "mla",
    "prune",
    "minitron",
    "distill",
    "merge",
    "ImportConfig",
    "QuantConfig",
    "MlaConfig",
    "PruneConfig",
    "MinitronConfig",
    "DistillConfig",
    "MergeConfig",
]


def load(path, **kwargs):
    """Load a checkpoint directory (any weightsmith output) as a ready transformers model."""
    from weightsmith.app.registry import load_runtimes as install
    from weightsmith.loading import load as _load

    install()  # the runtimes of quantized formats
    return _load(path, **kwargs)


def _pass_function(name: str):
    def run(*args, **kwargs):
        from weightsmith.app import api

        return getattr(api, name)(*args, **kwargs)

    return run


_passes.PASS_FUNCTIONS.update(
    {n: _pass_function(n) for n in ("import_checkpoint", "quant", "mla", "prune", "minitron", "distill", "merge")}
)


def __getattr__(name: str):
    import importlib

    api = importlib.import_module("weightsmith.app.api")

    if name in api.PASS_FUNCTIONS:
        return getattr(api, name)
    if name in api.CONFIGS:
        return api.config_class(api.CONFIGS[name])
    raise AttributeError(f"module 'weightsmith' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + [n for n in __all__ if n not in globals()])
