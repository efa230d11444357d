"""Atomic, streaming, deterministic checkpoint writer (Hugging Face layout).

Usage::

    with CheckpointWriter(dst, force=False) as w:
        w.plan([TensorSpec(name, shape, dtype), ...])   # shards and offsets decided up front
        w.write(name, tensor)                           # any order, any thread; memory = one tensor
        w.set_config(config)                            # a transformers config object
        w.copy_aux_files(src_dir, names)                # tokenizer, generation config, chat template
        w.finalize(manifest_fn)                         # hashes, manifest last, then rename into place

Because the full list of output tensors is known before any data is written, each shard's header
is written first and tensors are written straight to their final offsets with `os.pwrite`: no
shard-sized buffer, no second copy, and several workers can write at once. Files live in a sibling
`DST.tmp-<pid>` directory; the rename into place happens only after the manifest is written, so an
interrupted run never leaves an output that looks complete (a `kill -9` leaves the temporary, which
the next writer for that DST removes; see `destination`). DST is resolved once, and `force`
replaces only an empty directory or a weightsmith output. Tensor order is natural-sorted by
name (layers stay together), so equal inputs give byte-identical shards.

Under a launcher (docs/distributed.md) rank 0 creates the writer with `shared = True`; every other
rank opens the same staging directory with `CheckpointWriter.join(dst, tmp)`. `plan()` is then a
collective (rank 0 lays out the files and broadcasts `layout()`), after which any rank may write
any planned tensor (the same bytes twice across ranks is allowed). A joined writer never
creates, truncates, renames or removes anything: config, auxiliary files, index and manifest are
rank 0's. Before rank 0 finalizes, each rank calls `w.close_for_handoff()` (fsync + close) and
rank 0 merges every rank's `written_ranges()` with `mark_written()`.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from weightsmith.checkpoint import destination as dest
from weightsmith.checkpoint.reader import MANIFEST, ST_INDEX, ST_SINGLE
from weightsmith.checkpoint.st_format import build_header
from weightsmith.errors import CheckpointError, WeightsmithError
from weightsmith.util import FP8_DTYPES, element_size, natural_key

DEFAULT_MAX_SHARD = 5 * 10**9


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = element_size(self.dtype)
        for s in self.shape:
            n *= s
        return n

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        return cls(name, tuple(t.shape), t.dtype)


@dataclass
class _Slot:
    file: str
    offset: int  # absolute offset in the file
    spec: TensorSpec
    written: bool = False
    parts: list[tuple[int, int]] | None = None  # byte ranges written so far by write_range (sorted)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in a floating tensor. min/max propagate NaN and reach ±Inf, so one aminmax
    pass decides (torch.isfinite(t).all() is ~15x slower on CPU and allocates a mask)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach().reshape(-1))
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def _finite_bytes(name: str, tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes as stored, refusing NaN/Inf in floating (non-fp8) data."""
    if tensor.is_floating_point() and tensor.dtype not in FP8_DTYPES and not all_finite(tensor):
        raise WeightsmithError(f"refusing to write tensor {name!r}: it contains NaN or Inf")
    return memoryview(
        tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() if tensor.numel() else b""
    )


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [ST_SINGLE]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def assign_shards(specs: list[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Greedy fill in natural name order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class CheckpointWriter:
    def __init__(
        self,
        dst: str | os.PathLike,
        *,
        force: bool = False,
        max_shard_size: int = DEFAULT_MAX_SHARD,
        metadata: dict[str, str] | None = None,
    ):
        self.dst = dest.resolve_output(dst)  # once, up front: '..' and symlinks cannot move it later
        self.force = force
        self.max_shard_size = int(max_shard_size)
        self.metadata = {"format": "pt", **(metadata or {})}
        if self.dst.exists() and not force:
            raise WeightsmithError(
                f"{self.dst}: output already exists; choose another path or pass --force to replace it"
            )
        dest.refuse_foreign(self.dst)  # --force replaces only weightsmith outputs (or an empty directory)
        self.tmp = self.dst.parent / f".{self.dst.name}.tmp-{os.getpid()}"
        try:
            self.dst.parent.mkdir(parents=True, exist_ok=True)
            dest.remove_stale(self.dst)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except OSError as e:
            raise dest.os_error(e, self.dst) from None
        self._slots: dict[str, _Slot] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}  # one writer at a time per shard file (see _pwrite)
        self._config_written = False
        self._done = False
        self.follower = False  # a rank > 0 writing into rank 0's files (see join)
        self.shared = False  # rank 0 of a distributed run: plan() broadcasts the layout
        self.shards: list[str] = []
        self.total_size = 0

    # ---- several processes writing one output ----------------------------------------------
    def layout(self) -> dict:
        """What another rank needs to write into this plan's staging files (picklable)."""
        return {
            "shards": list(self.shards),
            "total_size": self.total_size,
            "slots": [(n, s.file, s.offset, s.spec) for n, s in self._slots.items()],
        }

    @classmethod
    def join(cls, dst: str | os.PathLike, tmp: str | os.PathLike) -> "CheckpointWriter":
        """Another rank's writer onto the staging directory rank 0 created (whose writer has
        `shared = True`). `plan()` is then collective: rank 0 lays the files out and broadcasts the
        layout, the others adopt it; after that any rank may pwrite any planned tensor."""
        w = cls.__new__(cls)
        w.dst, w.tmp = Path(dst), Path(tmp)
        w.force, w.max_shard_size, w.metadata = False, 0, {}
        w._slots, w._fds, w._file_locks = {}, {}, {}
        w._lock = threading.Lock()
        w._config_written, w._done, w.follower, w.shared = False, False, True, True
        w.shards, w.total_size = [], 0
        return w

    def _adopt(self, layout: dict) -> None:
        self._slots = {n: _Slot(f, off, spec) for n, f, off, spec in layout["slots"]}
        self._file_locks = {f: threading.Lock() for f in layout["shards"]}
        self.shards, self.total_size = list(layout["shards"]), int(layout["total_size"])
        for f in self.shards:
            try:
                self._fds[f] = os.open(self.tmp / f, os.O_RDWR)
            except OSError as e:
                self._close_fds()
                raise CheckpointError(
                    f"{self.tmp / f}: cannot open rank 0's staging file ({e.strerror}); every rank needs the output "
                    "directory on one shared filesystem, under the same path"
                ) from None

    def written_ranges(self) -> list[tuple[str, int, int]]:
        """(name, start, end) of every byte range this process wrote."""
        out = []
        for n, s in self._slots.items():
            if s.written:
                out.append((n, 0, s.spec.nbytes))
            elif s.parts:
                out += [(n, b, e) for b, e in s.parts]
        return out

    def mark_written(self, ranges: Iterable[tuple[str, int, int]]) -> None:
        """Count byte ranges written by other processes (overlaps allowed: they wrote the same bytes)."""
        spans: dict[str, list[tuple[int, int]]] = {}
        for n, b, e in ranges:
            spans.setdefault(n, []).append((b, e))
        for n, s in self._slots.items():
            if s.written:
                continue
            union: list[tuple[int, int]] = []
            for b, e in sorted(spans.get(n, []) + list(s.parts or [])):
                if union and b <= union[-1][1]:
                    union[-1] = (union[-1][0], max(union[-1][1], e))
                else:
                    union.append((b, e))
            if union and union[0][0] <= 0 and union[0][1] >= s.spec.nbytes:
                s.written, s.parts = True, None
            elif union:
                s.parts = union  # counted so far (a later call may complete it)

    def close_for_handoff(self) -> None:
        """fsync and close this process's file descriptors (another process reads the files next)."""
        for fd in self._fds.values():
            os.fsync(fd)
        self._close_fds()

    # ---- context management ------------------------------------------------------------
    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        self._close_fds()
        if not self.follower:  # the staging directory is rank 0's to remove
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._done = True

    def _close_fds(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()

    # ---- planning and writing ------------------------------------------------------------
    def plan(self, specs: Iterable[TensorSpec], *, layout: Mapping[str, str] | None = None) -> None:
        """Lay out every output tensor. `layout` (tensor name -> any shard key, e.g. the input's
        file name) keeps tensors that share a key in one shard, shards ordered by key as files
        are named (natural order); tensors it does not mention are packed greedily after them."""
        if self._slots:
            raise RuntimeError("CheckpointWriter.plan() called twice")
        if self.follower:  # collective: rank 0's layout (its specs are the same: every rank runs the same plan)
            from weightsmith import dist

            self._adopt(dist.broadcast_object(None, 0))
            return
        specs = sorted(specs, key=lambda s: natural_key(s.name))
        seen = set()
        for s in specs:
            if s.name in seen:
                raise WeightsmithError(f"internal error: output tensor {s.name!r} planned twice")
            seen.add(s.name)
        if layout:
            keyed: dict[str, list[TensorSpec]] = {}
            rest = []
            for s in specs:
                if s.name in layout:
                    keyed.setdefault(layout[s.name], []).append(s)
                else:
                    rest.append(s)
            groups = [keyed[k] for k in sorted(keyed, key=natural_key)] + (
                assign_shards(rest, self.max_shard_size) if rest else []
            )
        else:
            groups = assign_shards(specs, self.max_shard_size) if specs else [[]]
        self.shards = shard_names(len(groups))
        for fname, group in zip(self.shards, groups):
            header, offsets = build_header([(s.name, s.dtype, s.shape) for s in group], self.metadata)
            fd = os.open(self.tmp / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[fname] = fd
            self._file_locks[fname] = threading.Lock()
            os.pwrite(fd, header, 0)
            end = len(header) + (offsets[-1][1] if offsets else 0)
            os.ftruncate(fd, end)
            for s, (b, _e) in zip(group, offsets):
                self._slots[s.name] = _Slot(fname, len(header) + b, s)
            self.total_size += sum(s.nbytes for s in group)
        dest.check_free_space(self.dst, self.total_size)  # shards are sparse until written: check before data
        if self.shared:
            from weightsmith import dist

            dist.broadcast_object(self.layout(), 0)

    @property
    def planned(self) -> list[TensorSpec]:
        return [s.spec for s in self._slots.values()]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        slot = self._slots.get(name)
        if slot is None:
            raise WeightsmithError(f"internal error: tensor {name!r} was not in the output plan")
        if tuple(tensor.shape) != slot.spec.shape or tensor.dtype != slot.spec.dtype:
            raise WeightsmithError(
                f"internal error: tensor {name!r} is {list(tensor.shape)} {tensor.dtype}, planned "
                f"{list(slot.spec.shape)} {slot.spec.dtype}"
            )
        self.write_bytes(name, _finite_bytes(name, tensor))

    def write_bytes(self, name: str, data: memoryview | bytes) -> None:
        """Write a tensor's raw bytes (for byte-exact copies)."""
        slot = self._slots[name]
        if len(data) != slot.spec.nbytes:
            raise WeightsmithError(f"internal error: tensor {name!r} has {len(data)} bytes, planned {slot.spec.nbytes}")
        with self._lock:
            if slot.written or slot.parts:
                raise WeightsmithError(f"internal error: tensor {name!r} written twice")
            slot.written = True
        self._pwrite(slot.file, memoryview(data), slot.offset)

    def write_range(self, name: str, start: int, data: torch.Tensor | memoryview | bytes) -> None:
        """Write bytes [start, start + len) of a planned tensor (a row block, a chunk of a flat
        tensor): several threads may fill one tensor in parts. Overlaps are refused; the tensor
        counts as written once its ranges cover it. A tensor argument must have the planned dtype
        and finite values, like `write`."""
        slot = self._slots.get(name)
        if slot is None:
            raise WeightsmithError(f"internal error: tensor {name!r} was not in the output plan")
        if isinstance(data, torch.Tensor):
            if data.dtype != slot.spec.dtype:
                raise WeightsmithError(
                    f"internal error: part of tensor {name!r} is {data.dtype}, planned {slot.spec.dtype}"
                )
            data = _finite_bytes(name, data)
        view = memoryview(data).cast("B")
        end = start + len(view)
        if start < 0 or end > slot.spec.nbytes:
            raise WeightsmithError(
                f"internal error: bytes {start}..{end} are outside tensor {name!r} ({slot.spec.nbytes} bytes)"
            )
        with self._lock:
            if slot.written:
                raise WeightsmithError(f"internal error: tensor {name!r} written twice")
            parts = slot.parts if slot.parts is not None else []
            i = bisect.bisect_left(parts, (start, end))
            if (i > 0 and parts[i - 1][1] > start) or (i < len(parts) and parts[i][0] < end):
                raise WeightsmithError(f"internal error: bytes {start}..{end} of tensor {name!r} written twice")
            parts.insert(i, (start, end))
            slot.parts = parts
            if sum(e - b for b, e in parts) == slot.spec.nbytes:
                slot.written, slot.parts = True, None
        self._pwrite(slot.file, view, slot.offset + start)

    def _pwrite(self, fname: str, view: memoryview, pos: int) -> None:
        """pwrite all of `view` at `pos`. Writers of one file take turns: concurrent writes into one
        ext4 file contend on its inode lock in the kernel (measured: two threads reached a third of
        one thread's rate, burning CPU in sys time); a Python lock makes the waiter sleep instead."""
        fd = self._fds[fname]
        with self._file_locks[fname]:
            while view:
                n = os.pwrite(fd, view, pos)
                view = view[n:]
                pos += n

    def copy_from(self, name: str, ck, src_name: str | None = None) -> None:
        """Copy a tensor's stored bytes from a checkpoint without passing them through Python:
        os.copy_file_range (in-kernel, reflinks where the filesystem can), falling back to
        read + write. The source tensor must have the planned dtype and shape."""
        src_name = src_name or name
        slot = self._slots[name]
        span = ck.raw_span(src_name)
        info = ck.info(src_name)
        if (
            span is None
            or info.dtype != slot.spec.dtype
            or tuple(info.shape) != slot.spec.shape
            or not hasattr(os, "copy_file_range")
        ):
            self.write_bytes(name, ck.read_raw(src_name))
            return
        fd_in, off_in, count = span
        with self._lock:
            if slot.written or slot.parts:
                raise WeightsmithError(f"internal error: tensor {name!r} written twice")
            slot.written = True
        fd_out, off_out = self._fds[slot.file], slot.offset
        try:
            while count:
                with self._file_locks[slot.file]:  # in steps, so other writers of this file get turns
                    n = os.copy_file_range(fd_in, fd_out, min(count, 64 << 20), off_in, off_out)
                if n <= 0:
                    raise OSError("copy_file_range made no progress")
                off_in, off_out, count = off_in + n, off_out + n, count - n
        except OSError:  # EXDEV, ENOSYS, filesystems without support: plain copy of the rest
            self._pwrite(slot.file, memoryview(ck.read_raw(src_name))[slot.spec.nbytes - count :], off_out)

    # ---- non-weight files ----------------------------------------------------------------
    def set_config(self, config) -> None:
        """Write config.json through the transformers config object (never raw JSON edits)."""
        if self.follower:  # rank 0 writes the non-weight files
            return
        config.save_pretrained(self.tmp)
        self._config_written = True

    def copy_aux_files(self, src_dir: str | os.PathLike, names: Iterable[str]) -> list[str]:
        copied = []
        if self.follower:
            return [str(n) for n in names]
        for n in names:
            src = Path(src_dir) / n
            shutil.copyfile(src, self.tmp / n)
            copied.append(n)
        return copied

    def add_file(self, name: str, content: str | bytes) -> None:
        if self.follower:
            return
        data = content.encode() if isinstance(content, str) else content
        (self.tmp / name).write_bytes(data)

    # ---- completion ----------------------------------------------------------------------
    def missing(self) -> list[str]:
        return sorted((n for n, s in self._slots.items() if not s.written), key=natural_key)

    def finalize(self, manifest_fn: Callable[[Path], dict] | None = None) -> Path:
        """Check completeness, write the index, then the manifest (last), then rename into place."""
        if self.follower:
            raise RuntimeError("a joined CheckpointWriter does not finalize; rank 0 does")
        missing = self.missing()
        if missing:
            raise WeightsmithError(
                f"output incomplete: {len(missing)} planned tensors were never written (first: {missing[0]!r})"
            )
        if not self._config_written:
            raise WeightsmithError("internal error: output has no config.json")
        for fd in self._fds.values():
            os.fsync(fd)
        self._close_fds()
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {n: s.file for n, s in sorted(self._slots.items())},
            }
            (self.tmp / ST_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        if manifest_fn is not None:
            manifest = manifest_fn(self.tmp)
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        self._rename_into_place()
        self._done = True
        return self.dst

    def _rename_into_place(self) -> None:
        old = None
        if self.dst.exists():
            if not self.force:
                raise WeightsmithError(f"{self.dst}: appeared while writing; pass --force to replace it")
            dest.refuse_foreign(self.dst)
            old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
            os.replace(self.dst, old)
        try:
            os.replace(self.tmp, self.dst)
        except OSError as e:
            if old is not None:
                os.replace(old, self.dst)
            raise CheckpointError(f"{self.dst}: cannot move the finished output into place ({e})") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
