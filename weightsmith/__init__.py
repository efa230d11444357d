"""weightsmith: turn Hugging Face LLM checkpoints into efficient variants, offline.

Importing the package is lean (no CUDA initialisation, no transformers import); `load()` is the
one-call way to get a ready transformers model from any weightsmith output.
"""

from weightsmith.version import __version__

__all__ = ["__version__", "load"]


def load(path, **kwargs):
    """Load a checkpoint directory (any weightsmith output) as a ready transformers model."""
    from weightsmith.app.registry import load_runtimes as install
    from weightsmith.loading import load as _load

    install()  # the runtimes of quantized formats
    return _load(path, **kwargs)
