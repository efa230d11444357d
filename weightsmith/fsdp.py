"""Fully sharded training state under a launcher (torch FSDP2 `fully_shard`), for `distill --fsdp`.

Every parameter, its gradient and its optimizer state are split by rows over the ranks (FSDP2's
`Shard(0)`: rank r holds `torch.chunk(full, P)[r]`); a layer's full weights exist only while FSDP
all-gathers them for its forward and backward. accelerate's FSDP plugin is not used: accelerate
enables FSDP only for GPU runs (on CPUs its state stays MULTI_CPU), so the one tested path is
torch's own `fully_shard`, on gloo (CPUs) as on NCCL (GPUs).

Moving whole tensors in and out of the shards is done here, not with
`torch.distributed.checkpoint.state_dict` (its `broadcast_from_rank0` load re-assigns the module's
parameters, so the optimizer built after it holds other tensors than FSDP does after the first
backward):
- `shard_model`: rank 0 loads the model, the others build it on the meta device; after
  `fully_shard` each parameter's rows are scattered from rank 0 (a rank receives only its rows)
  and the buffers broadcast, so no rank but 0 ever holds the whole model;
- `gather_state` / `scatter_state`: the full model and optimizer state dicts on rank 0, in the
  format a plain `model.state_dict()` / `optimizer.state_dict()` has (so a state saved by a
  sharded run is loaded by an unsharded one and the other way round, at any world size).
Every function here is collective: every rank calls it, in the same order.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as tdist

from weightsmith import dist


def mesh(device: str):
    """A 1-D device mesh over all ranks (gloo on CPUs, NCCL on GPUs: the process group `dist` joined)."""
    from torch.distributed.device_mesh import init_device_mesh

    w = dist.world(device)
    return init_device_mesh("cuda" if device.startswith("cuda") else "cpu", (w.size,))


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _rows(n: int, size: int) -> int:
    return -(-n // size) if n else 0  # torch.chunk's chunk length: what every rank's padded shard has


def _scatter_rows(full: torch.Tensor | None, local: torch.Tensor, shape: torch.Size) -> None:
    """Copy rank 0's `full` (shape `shape`; None elsewhere) into every rank's `local` rows (torch.chunk order)."""
    w = dist.world()
    rows = _rows(shape[0], w.size)
    buf = torch.empty((rows, *shape[1:]), dtype=local.dtype, device=local.device)
    chunks = None
    if w.is_main:
        full = full.to(device=local.device, dtype=local.dtype)
        chunks = [c.contiguous() for c in torch.chunk(full, w.size)] if rows else []
        chunks += [full.new_empty((0, *shape[1:]))] * (w.size - len(chunks))
        chunks = [torch.cat([c, c.new_zeros((rows - c.shape[0], *shape[1:]))]) for c in chunks]
    tdist.scatter(buf, chunks, src=0)
    local.copy_(buf[: local.shape[0]])


def _gather_rows(local: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """The whole tensor on rank 0 from every rank's rows (None elsewhere)."""
    w = dist.world()
    rows = _rows(shape[0], w.size)
    buf = torch.cat([local, local.new_zeros((rows - local.shape[0], *shape[1:]))]).contiguous()
    parts = [torch.empty_like(buf) for _ in range(w.size)] if w.is_main else None
    tdist.gather(buf, parts, dst=0)
    if not w.is_main:
        return None
    return torch.cat(parts)[: shape[0]].cpu()


def _full(t: torch.Tensor) -> torch.Tensor | None:
    if _is_dtensor(t):
        return _gather_rows(t.to_local(), t.shape)
    return t.detach().cpu() if dist.world().is_main else None


@torch.no_grad()
def shard_model(
    load: Callable[[], torch.nn.Module],
    build_empty: Callable[[], torch.nn.Module],
    device_mesh,
    *,
    mp_policy=None,
) -> torch.nn.Module:
    """The model with every decoder layer and the root wrapped by `fully_shard` (parameters resharded
    after each forward). `load()` runs on rank 0 only; `build_empty()` (on the meta device) on the others."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    w = dist.world()
    if w.is_main:
        model = load()
        full = dict(model.named_parameters())  # the whole tensors stay alive here until scattered
    else:
        with torch.device("meta"):
            model = build_empty()
        full = {}
    kw = {"mesh": device_mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for layer in _layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)
    if not w.is_main:
        model.to_empty(device=device_mesh.device_type)
    for name, p in model.named_parameters():
        _scatter_rows(full.pop(name, None), p.to_local(), p.shape)
    del full
    for _, b in model.named_buffers():  # non-persistent ones too (RoPE inverse frequencies)
        dist.broadcast_(b, 0)
    return model


def _layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units FSDP gathers one at a time: the modules transformers itself keeps whole
    (`_no_split_modules`: the decoder layer classes), else the longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found[::-1]  # innermost first: fully_shard goes bottom-up
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def local_numel(model: torch.nn.Module) -> int:
    """Parameter elements this rank holds (its shards; the whole model when not sharded)."""
    return sum(p.to_local().numel() if _is_dtensor(p) else p.numel() for p in model.parameters())


@torch.no_grad()
def gather_model(model: torch.nn.Module) -> dict | None:
    """The model's state dict with whole tensors on rank 0 (None elsewhere), gathered one at a time."""
    msd = {}
    done: dict[int, torch.Tensor | None] = {}  # tied weights appear under two names: gathered once
    for name, t in model.state_dict().items():
        if id(t) not in done:
            done[id(t)] = _full(t)
        msd[name] = done[id(t)]
    return msd if dist.world().is_main else None


@torch.no_grad()
def gather_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[dict, dict] | None:
    """(model state dict, optimizer state dict) with whole tensors on rank 0, as an unsharded model
    and optimizer would give them; None on the other ranks."""
    msd = gather_model(model)
    osd = opt.state_dict()
    state = {}
    for pid in sorted(osd["state"]):
        state[pid] = {k: _full(v) if _is_dtensor(v) else v for k, v in osd["state"][pid].items()}
    if not dist.world().is_main:
        return None
    return msd, {"state": state, "param_groups": osd["param_groups"]}


@torch.no_grad()
def scatter_state(model: torch.nn.Module, opt: torch.optim.Optimizer, st: tuple[dict, dict] | None) -> None:
    """Load whole (model, optimizer) state dicts held by rank 0 (`st`; None elsewhere) into the
    sharded model and optimizer: each rank receives only its rows."""
    from torch.distributed.tensor import DTensor

    w = dist.world()
    msd, osd = st if w.is_main else ({}, None)
    for name, p in model.named_parameters():
        _scatter_rows(msd.get(name), p.to_local(), p.shape)
    for name, b in model.named_buffers():
        if w.is_main and name in msd:
            b.copy_(msd[name])
        dist.broadcast_(b, 0)
    params = list(model.parameters())
    # the skeleton (which states exist, scalars, hyper-parameters) from rank 0, the tensors by rows
    skeleton = None
    if w.is_main:
        skeleton = {
            "state": {
                pid: {
                    k: (("rows", tuple(v.shape)) if isinstance(v, torch.Tensor) and v.dim() > 0 else v)
                    for k, v in s.items()
                }
                for pid, s in osd["state"].items()
            },
            "param_groups": osd["param_groups"],
        }
    skeleton = dist.broadcast_object(skeleton, 0)
    state = {}
    for pid in sorted(skeleton["state"]):
        p, s = params[pid], {}
        for k, v in skeleton["state"][pid].items():
            if isinstance(v, tuple) and v and v[0] == "rows":
                local = torch.empty_like(p.to_local())
                _scatter_rows(osd["state"][pid][k] if w.is_main else None, local, p.shape)
                s[k] = DTensor.from_local(
                    local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
            else:
                s[k] = v
        state[pid] = s
    opt.load_state_dict({"state": state, "param_groups": skeleton["param_groups"]})
