"""The model skeleton on the meta device, and materialising parts of it from a checkpoint."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils._device import DeviceContext

from weightsmith.arch import ArchView
from weightsmith.engine.experts import unfuse_experts
from weightsmith.errors import CheckpointError, UnsupportedError


def get_path(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part) if not part.isdigit() else mod[int(part)]
    return mod


def set_path(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = get_path(root, parent_path) if parent_path else root
    if name.isdigit():
        parent[int(name)] = new
    else:
        setattr(parent, name, new)


class _MetaExceptLiterals(DeviceContext):
    """`with torch.device("meta")`, except that tensors built from Python literals (`torch.tensor(25.3)`)
    stay real: constants such as Gemma's non-persistent `embed_scale` buffer keep their value."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.tensor:
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def build_skeleton(config, view: ArchView, dtype: torch.dtype) -> nn.Module:
    """The full transformers model with no memory behind it; rotary tables and literal constants real;
    MoE experts unfused."""
    from transformers import AutoModelForCausalLM

    with _MetaExceptLiterals("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    decoder_path = view.layers_path.rsplit(".", 1)[0]
    decoder = get_path(model, decoder_path)
    rot = getattr(decoder, "rotary_emb", None)
    if rot is not None:  # its inv_freq is a non-persistent buffer computed from the config: rebuild it for real
        decoder.rotary_emb = type(rot)(config=model.config)
    moe = view.family.moe
    if moe is not None:
        layers = get_path(model, view.layers_path)
        for i in range(view.num_layers):
            if view.is_moe(i):
                block = get_path(layers[i], moe.module_root)
                if hasattr(block, "experts") and hasattr(block.experts, "gate_up_proj"):
                    block.experts = unfuse_experts(block.experts, moe.expert_mlp.modules)
    return model


def materialize(
    module: nn.Module, names_to_disk: Callable[[str], str], ck, device: torch.device | str, what: str
) -> nn.Module:
    """Allocate `module` on `device` and fill every parameter/persistent buffer from the checkpoint."""
    non_persistent = _non_persistent(module)
    constants = _constants(module, non_persistent)
    module.to_empty(device=device)
    state = dict(module.named_parameters())
    state.update({n: b for n, b in module.named_buffers() if n not in non_persistent})
    for name, t in state.items():
        disk = names_to_disk(name)
        if disk not in ck:
            raise CheckpointError(f"{ck.root}: {what} needs tensor {disk!r}, which the checkpoint lacks")
        src = ck.get(disk, dequantize=True)
        if tuple(src.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{ck.root}: tensor {disk!r} has shape {list(src.shape)}, the config implies {list(t.shape)}"
            )
        with torch.no_grad():
            t.copy_(src)
    for name in non_persistent:
        # counters such as UnfusedExperts.tokens start at zero; anything else would need its own init
        mod_name, _, buf = name.rpartition(".")
        owner = get_path(module, mod_name) if mod_name else module
        if name in constants:
            owner._buffers[buf] = constants[name].to(device)
        elif name.endswith("tokens"):
            getattr(owner, buf).zero_()
        else:
            raise UnsupportedError(f"{what}: non-persistent buffer {name!r} cannot be restored from the checkpoint")
    return module


def _non_persistent(module: nn.Module) -> set[str]:
    return {
        f"{mn}.{b}" if mn else b
        for mn, m in module.named_modules()
        for b in getattr(m, "_non_persistent_buffers_set", ())
    }


def _constants(module: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """Real (not meta) non-persistent buffers, i.e. constants computed at construction: kept across to_empty."""
    out = {}
    for name in names:
        mod_name, _, buf = name.rpartition(".")
        t = (get_path(module, mod_name) if mod_name else module)._buffers.get(buf)
        if t is not None and t.device.type != "meta" and not name.endswith("tokens"):
            out[name] = t.detach().to("cpu", copy=True)
    return out


def release(module: nn.Module) -> None:
    """Give a materialised module's memory back (it returns to the meta device; constant buffers stay real)."""
    constants = _constants(module, _non_persistent(module))
    module.to_empty(device="meta")
    for name, t in constants.items():
        mod_name, _, buf = name.rpartition(".")
        (get_path(module, mod_name) if mod_name else module)._buffers[buf] = t
