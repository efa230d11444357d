"""The safetensors container format: header parsing with precise errors, and header building.

Reading tensor *data* goes through the `safetensors` library (`safe_open`, mmap). We parse the
header ourselves only to validate a file before use (truncation, corruption, overlapping data) with
an error that names the file, and to build headers for the streaming writer, which the library has
no API for (it writes whole dicts at once; we write tensor by tensor at planned offsets so memory
stays bounded). Format: 8-byte little-endian header length N, N bytes of JSON, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from weightsmith.errors import CheckpointError
from weightsmith.util import ST_TO_TORCH, TORCH_TO_ST, element_size

MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers too


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int  # offset inside the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Parse and validate a safetensors header. Returns (entries, metadata, data_start)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes, no header); re-download or re-create it"
                )
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header (declares {n} header bytes, file has {size}); the file is "
                    "damaged or not safetensors"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: corrupt safetensors header ({e}); the file is damaged or not safetensors"
        ) from None
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for tensor {name!r}") from None
        if dtype not in ST_TO_TORCH:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype} that weightsmith cannot read")
        expected = element_size(ST_TO_TORCH[dtype])
        for s in shape:
            expected *= s
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} declares {end - begin} bytes but shape {list(shape)} {dtype} needs {expected}"
            )
        entries[name] = TensorEntry(name, dtype, shape, int(begin), int(end))
    data_start = 8 + n
    data_len = max((e.end for e in entries.values()), default=0)
    if data_start + data_len > size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: data needs {data_start + data_len} bytes, file has {size}; "
            "re-download or re-create it"
        )
    spans = sorted((e.begin, e.end, e.name) for e in entries.values())
    for (b0, e0, n0), (b1, _e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: corrupt safetensors file: tensors {n0!r} and {n1!r} overlap")
    return entries, metadata, data_start


def build_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, list[tuple[int, int]]]:
    """Lay tensors out contiguously in the given order. Returns (header bytes incl. length prefix, offsets)."""
    header: dict = {"__metadata__": dict(metadata)}
    offsets = []
    pos = 0
    for name, dtype, shape in entries:
        n = element_size(dtype)
        for s in shape:
            n *= s
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append((pos, pos + n))
        pos += n
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # pad so tensor data starts 8-byte aligned, as the library does
    return struct.pack("<Q", len(raw)) + raw, offsets
