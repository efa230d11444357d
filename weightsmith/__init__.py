"""weightsmith: turn Hugging Face LLM checkpoints into efficient variants, offline.

Importing the package is lean (no torch, no transformers, no CUDA initialisation): the pass
functions and their config classes load on first use.

    import weightsmith
    weightsmith.quant("path/to/model", "out/w4", weightsmith.QuantConfig(method="rtn", bits=4))
    model = weightsmith.load("out/w4")  # a ready transformers model

Pass functions (see `weightsmith.api`): import_checkpoint, quant, mla, prune, minitron, distill,
merge. Config classes: ImportConfig, QuantConfig, MlaConfig, PruneConfig, MinitronConfig,
DistillConfig, MergeConfig.
"""

__version__ = "0.1.0"
__all__ = ["__version__", "load", "import_checkpoint", "quant", "mla", "prune", "minitron", "distill", "merge",
           "ImportConfig", "QuantConfig", "MlaConfig", "PruneConfig", "MinitronConfig", "DistillConfig", "MergeConfig"]


def load(path, **kwargs):
    """Load a checkpoint directory (any weightsmith output) as a ready transformers model."""
    from weightsmith.loading import load as _load

    return _load(path, **kwargs)


def __getattr__(name: str):
    import importlib

    api = importlib.import_module("weightsmith.api")

    if name in api.PASS_FUNCTIONS:
        return getattr(api, name)
    if name in api.CONFIGS:
        return api.config_class(api.CONFIGS[name])
    raise AttributeError(f"module 'weightsmith' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + [n for n in __all__ if n not in globals()])
