"""`weightsmith.load(dir)`: a ready transformers model from any weightsmith output.

Plain checkpoints load with `AutoModelForCausalLM.from_pretrained`. Checkpoints whose
`quantization_config.quant_method` has a registered runtime (the quantization issue registers its
formats here) are built by that runtime, so `eval`/`diff` work on them too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from weightsmith.checkpoint.resolve import open_checkpoint
from weightsmith.errors import UnsupportedError

# quant_method -> loader(checkpoint, dtype, device) -> model
RUNTIME_LOADERS: dict[str, Callable[..., Any]] = {}


def load(path, *, dtype: torch.dtype | str | None = torch.float32, device: str = "cpu", allow_pickle: bool = False, allow_download: bool = False):
    from transformers import AutoModelForCausalLM

    ck = open_checkpoint(str(path), allow_pickle=allow_pickle, allow_download=allow_download)
    if isinstance(dtype, str):
        from weightsmith.util import dtype_from_name

        dtype = dtype_from_name(dtype)
    qc = ck.config_dict.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method:
        loader = RUNTIME_LOADERS.get(method)
        problems: dict[str, str] = {}
        if loader is None:
            problems = _load_runtimes()
            loader = RUNTIME_LOADERS.get(method)
        if loader is None:
            why = "; ".join(problems.values())
            raise UnsupportedError(
                f"{ck.root}: quantization method {method!r} has no weightsmith runtime; supported: {', '.join(sorted(RUNTIME_LOADERS)) or 'none'}"
                + (f" ({why})" if why else "")
            )
        return loader(ck, dtype=dtype, device=device)
    model = AutoModelForCausalLM.from_pretrained(ck.root, dtype=dtype, use_safetensors=not ck.is_pickle)
    return model.to(device).eval()


def _load_runtimes() -> dict[str, str]:
    """Import the modules that register runtimes (lazy so `import weightsmith` stays lean); returns why any failed."""
    import importlib

    problems = {}
    for mod in RUNTIME_MODULES:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            problems[mod] = f"{mod} is unavailable because {e}"
    return problems


RUNTIME_MODULES: list[str] = ["weightsmith.quant.runtime"]
