"""`weightsmith.load(dir)`: a ready transformers model from any weightsmith output.

Plain checkpoints load with `AutoModelForCausalLM.from_pretrained`. Checkpoints whose
`quantization_config.quant_method` has a runtime in RUNTIMES are built by that runtime, so
`eval`/`diff` work on them too. The table is filled at start-up by the application
(weightsmith.app.registry.load(); `weightsmith.load()` does it), never by the runtimes themselves.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from weightsmith.checkpoint.resolve import open_checkpoint
from weightsmith.errors import UnsupportedError


@dataclass(frozen=True)
class Runtime:
    """How to use checkpoints of one quant_method: build the model, count its logical parameters."""

    load: Callable[..., Any]  # (checkpoint, dtype=, device=) -> model
    param_count: Callable[[Any], int]  # (checkpoint) -> parameters (packed weights at their unpacked size)


RUNTIMES: dict[str, Runtime] = {}  # quant_method -> Runtime
RUNTIME_PROBLEMS: dict[str, str] = {}  # runtime module -> why it could not be imported


def load(
    path,
    *,
    dtype: torch.dtype | str | None = torch.float32,
    device: str = "cpu",
    allow_pickle: bool = False,
    allow_download: bool = False,
):
    from transformers import AutoModelForCausalLM

    ck = open_checkpoint(str(path), allow_pickle=allow_pickle, allow_download=allow_download)
    if isinstance(dtype, str):
        from weightsmith.util import dtype_from_name

        dtype = dtype_from_name(dtype)
    qc = ck.config_dict.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method:
        runtime = RUNTIMES.get(method)
        if runtime is None:
            why = "; ".join(RUNTIME_PROBLEMS.values())
            raise UnsupportedError(
                f"{ck.root}: quantization method {method!r} has no weightsmith runtime; supported: "
                f"{', '.join(sorted(RUNTIMES)) or 'none'}" + (f" ({why})" if why else "")
            )
        return runtime.load(ck, dtype=dtype, device=device)
    with _whole_weights():
        model = AutoModelForCausalLM.from_pretrained(ck.root, dtype=dtype, use_safetensors=not ck.is_pickle)
    return model.to(device).eval()


@contextlib.contextmanager
def _whole_weights():
    """Real weights on every rank that loads. `accelerate launch --use_fsdp` sets
    FSDP_CPU_RAM_EFFICIENT_LOADING=true, and transformers then fills the model with zeros on every
    rank but local rank 0 (expecting FSDP to broadcast them later): weightsmith loads a model where
    it is needed (`distill --fsdp` scatters rank 0's itself), so that shortcut is turned off here."""
    key = "FSDP_CPU_RAM_EFFICIENT_LOADING"
    saved = os.environ.get(key)
    if saved is None:
        yield
        return
    os.environ[key] = "false"
    try:
        yield
    finally:
        os.environ[key] = saved
