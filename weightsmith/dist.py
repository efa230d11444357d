"""Running one pass on several processes with torch.distributed (torchrun / accelerate launch).

A launcher sets WORLD_SIZE, RANK and the rendezvous variables; `world()` then joins the process
group once (NCCL when the run's device is a GPU, gloo otherwise) and every later call is cheap.
Without a launcher every function here is the single-process identity, so passes call them
unconditionally and a plain run is unchanged.

The rules every distributed pass follows:
- calibration windows are split into contiguous blocks (`shard`), one per rank, in rank order;
- statistics are summed with `sum_ordered`: every element is added over the ranks in rank order
  (small tensors: gathered whole; large ones: each rank sums its block of everyone's copy, then
  the blocks are gathered), so the same world size gives the same bits whatever the backend's
  reduction tree does (a plain all_reduce does not promise that);
- expensive solves are spread by `assign_owners` (deterministic longest-job-first by cost) and
  their results shared with `broadcast_`/`broadcast_object`;
- every rank makes the same collective calls in the same order (a pass loops over its modules in
  plan order on every rank, owner or not).

The contract with the runner and the writer (docs/distributed.md):
- rank 0 hashes the inputs, takes the output lock and decides freshness, and broadcasts the
  decision; every rank plans; rank 0 creates the staging directory and broadcasts its path;
- every rank gets a `ctx.writer` that can write any planned tensor at its planned offset; every
  planned tensor is written by at least one rank (two ranks writing the same bytes is allowed);
- at the end the written byte ranges of all ranks are gathered, rank 0 checks completeness,
  writes index, config, card and manifest (which records `environment.world_size`) and renames once;
- a rank that fails leaves a one-line marker beside the output; its peers, stopped by the failed
  collective or the launcher's SIGTERM, report "rank R failed: <message>" and exit non-zero.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as tdist

from weightsmith.errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_WORLD: World | None = None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise UsageError(
            f"environment variable {name}={raw!r} is not an integer; unset it or fix the launcher"
        ) from None


_SOLO = 0


@contextlib.contextmanager
def solo() -> Iterator[None]:
    """Work this rank does alone, while the others do other work (a minitron candidate repaired and
    scored by its owner): inside, `world()` is a one-process world, so every reduction and
    broadcast here is the identity and nothing waits for a peer that is not coming."""
    global _SOLO
    _SOLO += 1
    try:
        yield
    finally:
        _SOLO -= 1


def world(device: str | None = None) -> World:
    """This process's place in the run; joins the process group on first use under a launcher."""
    real = _joined(device)
    return World(local_rank=real.local_rank) if _SOLO else real


def _joined(device: str | None) -> World:
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    size = _env_int("WORLD_SIZE", 1)
    if size <= 1:
        _WORLD = World()
        return _WORLD
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if not tdist.is_available():
        raise UsageError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run without a launcher")
    use_cuda = (device or "").startswith("cuda") and torch.cuda.is_available()
    backend = os.environ.get("WEIGHTSMITH_DIST_BACKEND") or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    if not tdist.is_initialized():
        # peers wait in a collective while rank 0 alone hashes inputs, prepares calibration data or
        # hashes the output: generous by default for big checkpoints
        timeout = datetime.timedelta(seconds=_env_int("WEIGHTSMITH_DIST_TIMEOUT", 4 * 3600))
        tdist.init_process_group(backend=backend, timeout=timeout)
    _WORLD = World(rank=tdist.get_rank(), size=tdist.get_world_size(), local_rank=local, backend=backend)
    return _WORLD


def reset() -> None:
    """Forget the cached world (tests; the process group itself is left to torch)."""
    global _WORLD
    if _WORLD is not None and _WORLD.distributed and tdist.is_initialized():
        tdist.destroy_process_group()
    _WORLD = None


def local_device(device: str) -> str:
    """The device this rank computes on: 'cuda' becomes 'cuda:LOCAL_RANK' under a launcher."""
    w = world(device)
    if w.distributed and device == "cuda":
        return f"cuda:{w.local_rank}"
    return device


def shard(n: int, w: World | None = None) -> slice:
    """This rank's contiguous block of n items (the first n % size ranks get one more)."""
    w = w or world()
    base, extra = divmod(n, w.size)
    start = w.rank * base + min(w.rank, extra)
    return slice(start, start + base + (1 if w.rank < extra else 0))


def _for_backend(t: torch.Tensor) -> torch.Tensor:
    """NCCL moves only GPU tensors: a CPU tensor (a Gram kept on the host) travels via this rank's GPU."""
    w = world()
    if w.backend == "nccl" and t.device.type != "cuda":
        return t.to(f"cuda:{w.local_rank}")
    return t


SMALL_SUM = 1 << 16  # elements x ranks up to which sum_ordered broadcasts whole tensors (fewer steps)


def sum_ordered(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of `t`, added in rank order on every rank: deterministic for a world size.

    Small tensors: every rank's copy is broadcast in turn. Large ones go as a reduce-scatter then
    an all-gather: rank r receives block r of every rank's tensor (all_to_all), adds the blocks in
    rank order and shares its sum. Each element is p0 + p1 + ... in rank order either way (the
    same bits), but a rank receives 2·(P-1)/P of the tensor instead of (P-1) copies of it, and
    holds about three copies whatever the world size."""
    w = world()
    if not w.distributed:
        return t
    x = _for_backend(t.contiguous())
    n = x.numel()
    if n * w.size <= SMALL_SUM:
        # one broadcast per rank, in rank order, into one buffer: two copies of `t` at a time
        out = torch.empty_like(x)
        buf = torch.empty_like(x)
        for r in range(w.size):
            src = x if r == w.rank else buf
            tdist.broadcast(src, r)
            if r == 0:
                out.copy_(src)
            else:
                out += src
        _count((w.size - 1) * n * x.element_size())
        return out.to(t.device)
    # reduce-scatter then all-gather: about three copies of `t` at a time whatever the world size,
    # 2(P-1)/P of it received
    block = -(-n // w.size)
    flat = x.reshape(-1)
    send = flat if block * w.size == n else torch.cat([flat, flat.new_zeros(block * w.size - n)])
    recv = torch.empty_like(send)
    tdist.all_to_all_single(recv, send)  # recv[r·block:(r+1)·block] = rank r's copy of my block
    del send
    mine = recv[:block].clone()
    for r in range(1, w.size):
        mine += recv[r * block : (r + 1) * block]
    out = recv  # reused: block r of the sum goes to out[r·block:(r+1)·block]
    tdist.all_gather(list(out.view(w.size, block).unbind(0)), mine)
    _count(2 * (w.size - 1) * block * x.element_size())
    return out[:n].view(t.shape).to(t.device)


def sum_tree(tree: Any) -> Any:
    """`tree` (tensors, floats and ints in nested lists/tuples) summed over ranks in rank order,
    same structure back: each tensor through `sum_ordered`, all the scalars together in one float64
    tensor (ints come back as ints; exact below 2**53). The one reduction of every accumulator whose
    state is a few tensors and counts. No-op in one process."""
    if not world().distributed:
        return tree
    scalars: list[float] = []

    def collect(x):
        if isinstance(x, (list, tuple)):
            for v in x:
                collect(v)
        elif not isinstance(x, torch.Tensor):
            scalars.append(float(x))

    collect(tree)
    summed = iter(sum_ordered(torch.tensor(scalars, dtype=torch.float64)).tolist() if scalars else ())

    def rebuild(x):
        if isinstance(x, (list, tuple)):
            return type(x)(rebuild(v) for v in x)
        if isinstance(x, torch.Tensor):
            return sum_ordered(x)
        v = next(summed)
        return int(round(v)) if isinstance(x, int) else v

    return rebuild(tree)


def sum_int(x: int) -> int:
    w = world()
    if not w.distributed:
        return int(x)
    return int(sum_ordered(torch.tensor([int(x)], dtype=torch.int64)).item())


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    """Overwrite `t` in place on every rank with rank `src`'s value (shape and dtype must agree)."""
    w = world()
    if w.distributed:
        buf = _for_backend(t if t.is_contiguous() else t.contiguous())
        tdist.broadcast(buf, src)
        _count(0 if w.rank == src else t.numel() * t.element_size())
        if buf is not t:
            t.copy_(buf)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    w = world()
    if not w.distributed:
        return obj
    box = [obj if w.rank == src else None]
    tdist.broadcast_object_list(box, src)
    _count(0 if w.rank == src else _pickled_size(box[0]))
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    w = world()
    if not w.distributed:
        return [obj]
    out: list[Any] = [None] * w.size
    tdist.all_gather_object(out, obj)
    _count(sum(_pickled_size(o) for r, o in enumerate(out) if r != w.rank))
    return out


def barrier() -> None:
    w = world()
    if w.distributed:
        tdist.barrier()


def all_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on every rank."""
    w = world()
    if not w.distributed:
        return bool(flag)
    return all(gather_objects(bool(flag)))


def owned(costs: Sequence[float], w: World | None = None) -> list[int]:
    """Indices of the jobs this rank owns under `assign_owners(costs)`."""
    w = w or world()
    return [j for j, r in enumerate(assign_owners(costs, w.size)) if r == w.rank]


def assign_owners(costs: Sequence[float], size: int | None = None) -> list[int]:
    """Owner rank of each job: longest job first to the least-loaded rank (ties: lowest index/rank).
    Depends only on the costs and the world size, so every rank computes the same answer."""
    size = size or world().size
    load = [0.0] * size
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-float(costs[j]), j)):
        r = min(range(size), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += float(costs[j])
    return owner


# ---- traffic accounting (bench/distributed.py reads it) ----------------------------------------
_TRAFFIC = {"collectives": 0, "bytes_received": 0}


def _count(nbytes: int) -> None:
    _TRAFFIC["collectives"] += 1
    _TRAFFIC["bytes_received"] += int(nbytes)


def _pickled_size(obj: Any) -> int:
    import pickle

    return len(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def traffic(reset: bool = False) -> dict[str, int]:
    """Collectives this process made through this module and the payload bytes it received from
    its peers (an all-gather of n bytes receives (size-1)·n; the root of a broadcast receives
    nothing; objects count as pickled). Collectives made elsewhere (DDP's gradient all-reduce)
    are not counted."""
    out = dict(_TRAFFIC)
    if reset:
        _TRAFFIC.update(collectives=0, bytes_received=0)
    return out
