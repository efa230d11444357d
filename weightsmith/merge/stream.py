"""Streaming I/O of a merge: tensors in parts, straight from the parents' files into reused buffers.

A large tensor is never held whole. It is cut into parts (element ranges of the flat tensor, or
whole 128-row block strips for block-scaled fp8); each part of each parent is read with
`os.preadv` into a buffer that belongs to the worker thread and is reused for the next part, then
merged, and written at its place in the output with `CheckpointWriter.write_range`. Memory is a
few parts per worker whatever the model size, reused buffers cost no page faults, and parts of
one tensor can go to different workers. Every part is computed independently of the others, so
the output does not depend on the part size or the number of workers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from weightsmith.checkpoint.reader import pread_exact
from weightsmith.errors import CheckpointError
from weightsmith.util import FP8_DTYPES, element_size

PART_BYTES = 8 << 20  # bytes of one parent's tensor per part (a few MB: parts stay in the CPU caches)
REDUCE_ELEMS = 1 << 15  # flat parts start on multiples of this: the δ gate's sums use this fixed grid


class _Buffers(threading.local):
    """Per-thread scratch buffers, grown on demand and reused."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, nbytes: int) -> torch.Tensor:
        b = self.bufs.get(key)
        if b is None or b.numel() < nbytes:
            b = self.bufs[key] = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return b[:nbytes]


BUFFERS = _Buffers()


@dataclass(frozen=True)
class Part:
    """Bytes [start, stop) of a tensor's storage; `rows`/`block_rows` for fp8 strips."""

    index: int
    start: int
    stop: int
    rows: tuple[int, int] | None = None  # fp8: weight rows r0..r1
    block_rows: tuple[int, int] | None = None  # fp8: scale rows b0..b1


def parts_of(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    fp8_block: tuple[int, int] | None = None,
    part_bytes: int | None = None,
) -> list[Part]:
    """Cut a tensor into parts of about `part_bytes` (fp8 with block scales: whole block-rows)."""
    part_bytes = part_bytes or PART_BYTES
    esize = element_size(dtype)
    numel = 1
    for s in shape:
        numel *= s
    if fp8_block is not None:
        rows, cols = shape
        bm = fp8_block[0]
        step = max(bm, (part_bytes // max(cols * esize, 1)) // bm * bm)
        out = []
        for i, r0 in enumerate(range(0, rows, step)):
            r1 = min(rows, r0 + step)
            out.append(Part(i, r0 * cols * esize, r1 * cols * esize, (r0, r1), (r0 // bm, -(-r1 // bm))))
        return out or [Part(0, 0, 0, (0, 0), (0, 0))]
    step = max(REDUCE_ELEMS, (part_bytes // esize) // REDUCE_ELEMS * REDUCE_ELEMS)
    return [Part(i, a * esize, min(numel, a + step) * esize) for i, a in enumerate(range(0, numel, step))] or [
        Part(0, 0, 0)
    ]


def read_part(ck, name: str, start: int, stop: int, key: str) -> torch.Tensor:
    """Bytes [start, stop) of a stored tensor, in this thread's buffer `key` (valid until the
    thread reads into the same key again)."""
    buf = BUFFERS.get(key, stop - start)
    span = ck.raw_span(name)
    if span is None:  # pickled checkpoint: no file offsets
        buf.copy_(torch.frombuffer(ck.read_raw(name), dtype=torch.uint8)[start:stop])
        return buf
    fd, offset, count = span
    if stop > count:
        raise CheckpointError(f"{ck.root}: bytes {start}..{stop} are outside tensor {name!r} ({count} bytes)")
    pread_exact(fd, buf, offset + start, ck.root, name)
    return buf


def typed(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    t = buf.view(dtype)
    return t.view(shape) if shape is not None else t


def out_buffer(dtype: torch.dtype, numel: int, key: str = "out") -> torch.Tensor:
    return typed(BUFFERS.get(key, numel * element_size(dtype)), dtype)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES
