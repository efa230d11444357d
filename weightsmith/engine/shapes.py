"""One check for every pass: each tensor's shape agrees with what config.json implies.

The expected shapes come from the transformers model built from the config on the meta device (no
memory), with MoE experts unfused as on disk, so what passes this check loads with a plain
`from_pretrained`. Tensors the model does not have (quantized `qweight`/`scales`, fp8 scales,
MTP layers) are not this check's business; a missing tensor is `require_complete`'s.
"""

from __future__ import annotations

import copy

import torch

from weightsmith.arch import arch_for, supports
from weightsmith.errors import CheckpointError, WeightsmithError

_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}  # config JSON -> shapes (a merge's parents share one config)


def expected_shapes(config) -> dict[str, tuple[int, ...]]:
    """Disk tensor name -> shape for every parameter and persistent buffer the config implies.
    Building the meta skeleton costs seconds for a DeepSeek-V3-sized config (45k tensors), so
    results are kept per config."""
    try:
        key = config.to_json_string(use_diff=False)
    except Exception:  # a config transformers cannot serialise: no caching
        key = None
    if key is not None and key in _CACHE:
        return _CACHE[key]
    shapes = _expected_shapes(config)
    if key is not None:
        if len(_CACHE) >= 4:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = shapes
    return shapes


def _expected_shapes(config) -> dict[str, tuple[int, ...]]:
    from weightsmith.engine.skeleton import build_skeleton

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # shapes of the unquantized model; packed tensors have other names
    view = arch_for(cfg)
    model = build_skeleton(cfg, view, torch.bfloat16)
    out: dict[str, tuple[int, ...]] = {}
    for path, p in model.named_parameters():
        out[view.module_to_disk(path)] = tuple(p.shape)
    non_persistent = {
        f"{mn}.{b}" if mn else b
        for mn, m in model.named_modules()
        for b in getattr(m, "_non_persistent_buffers_set", ())
    }
    for path, b in model.named_buffers():
        if path not in non_persistent:
            out[view.module_to_disk(path)] = tuple(b.shape)
    return out


def check_shapes(ck) -> None:
    """Raise one line naming the first tensor whose shape disagrees with config.json, and the fix."""
    try:
        config = ck.config
    except WeightsmithError:
        return  # an unknown model type fails later with its own message
    if supports(config) is not None:
        return  # the pass reports why this architecture is unsupported
    try:
        want = expected_shapes(config)
    except WeightsmithError:
        raise
    except Exception as e:  # transformers cannot build the model from this config
        raise CheckpointError(
            f"{ck.root / 'config.json'}: transformers cannot build the model it describes ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:160]}); fix config.json"
        ) from None
    for name in ck.names:
        shape = want.get(name)
        if shape is None or ck.is_fp8(name) and len(shape) != len(ck.info(name).shape):
            continue
        have = tuple(ck.info(name).shape)
        if have != shape:
            raise CheckpointError(
                f"{ck.root}: tensor {name!r} ({ck.info(name).file}) has shape {list(have)}, but config.json implies "
                f"{list(shape)}; "
                "the weights and config.json do not belong together (fix the config or the weights)"
            )
