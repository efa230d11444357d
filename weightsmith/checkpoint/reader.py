"""Lazy, validated access to a checkpoint: names, shapes, dtypes and config without reading data.

A `Checkpoint` wraps a directory in Hugging Face layout (one `model.safetensors`, or shards plus
`model.safetensors.index.json`; pickled `.bin` only on request). Tensors are handed out one at a
time, read with `os.preadv` straight into the tensor's memory at the offset the (validated) header
gives. We deliberately do not keep `safe_open` mmaps: every page of a mapped shard that was ever
touched stays in the process's RSS while the mapping lives, so a layer-by-layer pass over a 13 GB
checkpoint would show 13 GB resident; with pread, memory is one tensor. fp8 e4m3 weights with DeepSeek-style
`weight_scale_inv` block scales are first-class: `get(name, dequantize=True)` applies the scales.
Opening validates the index (plain file names inside the directory, every listed tensor present,
no tensor in two shards) and every header, so a damaged checkpoint fails before any work starts.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch

from weightsmith.checkpoint import fp8
from weightsmith.checkpoint.st_format import TensorEntry, read_header
from weightsmith.errors import CheckpointError, UnsupportedError
from weightsmith.util import ST_TO_TORCH, natural_key

ST_SINGLE = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
PT_SINGLE = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
MANIFEST = "manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class Origin:
    """Where a checkpoint came from, as recorded in manifests."""

    kind: str  # "path" | "hub" | "gguf"
    path: str
    repo_id: str | None = None
    revision: str | None = None
    gguf_file: str | None = None


@dataclass
class _Layout:
    files: list[str]
    entries: dict[str, TensorInfo]
    offsets: dict[str, TensorEntry] = field(default_factory=dict)
    data_start: dict[str, int] = field(default_factory=dict)
    pickle: bool = False


def _check_plain_file(root: Path, contain: Path, fname: str, index_name: str) -> Path:
    """An index may only point at plain file names inside the checkpoint directory."""
    if (
        not isinstance(fname, str)
        or not fname
        or fname != os.path.basename(fname)
        or fname in (".", "..")
        or "\\" in fname
        or os.path.isabs(fname)
    ):
        raise CheckpointError(
            f"{root / index_name}: weight_map entry {fname!r} is not a plain file name inside {root}; refusing to read "
            "outside the checkpoint"
        )
    path = root / fname
    real = path.resolve()
    if not real.is_relative_to(contain.resolve()):
        raise CheckpointError(
            f"{root / index_name}: {fname!r} resolves to {real}, outside {contain}; refusing to follow a link out of "
            "the checkpoint"
        )
    if not path.exists():
        raise CheckpointError(f"{root / index_name}: lists shard {fname!r}, which is missing from {root}")
    if not real.is_file():
        raise CheckpointError(f"{root / index_name}: {fname!r} is not a regular file")
    return path


def _load_index(root: Path, index_name: str) -> dict[str, str]:
    try:
        data = json.loads((root / index_name).read_text())
        wm = data["weight_map"]
        if not isinstance(wm, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{root / index_name}: not a valid index (needs a 'weight_map' object): {e}") from None
    return wm


def pread_exact(fd: int, buf: torch.Tensor, pos: int, where, name: str) -> None:
    """Fill the uint8 tensor `buf` with the file's bytes from `pos` (os.preadv, no mmap); a file
    that ends early (truncated after opening) is a CheckpointError naming the tensor."""
    view = memoryview(buf.numpy())
    while view:
        n = os.preadv(fd, [view], pos)
        if n <= 0:
            raise CheckpointError(f"{where}: file ended while reading tensor {name!r}; it was truncated after opening")
        view, pos = view[n:], pos + n


class Checkpoint:
    """A checkpoint directory opened lazily. Use `open_checkpoint()` to resolve paths, Hub ids and GGUF files."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        allow_pickle: bool = False,
        origin: Origin | None = None,
        contain: Path | None = None,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CheckpointError(f"{self.root}: not a directory")
        self.origin = origin or Origin(kind="path", path=str(self.root))
        self._contain = contain or self.root
        self._allow_pickle = allow_pickle
        self._fds: dict[str, int] = {}
        self._fd_lock = threading.Lock()
        self._pickle_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._layout = self._discover()

    # ---- discovery and validation -------------------------------------------------------
    def _discover(self) -> _Layout:
        root = self.root
        if (root / ST_INDEX).exists():
            wm = _load_index(root, ST_INDEX)
            files = sorted(set(wm.values()), key=natural_key)
            paths = {f: _check_plain_file(root, self._contain, f, ST_INDEX) for f in files}
            return self._read_safetensors(paths, wm)
        if (root / ST_SINGLE).exists():
            path = _check_plain_file(root, self._contain, ST_SINGLE, ST_SINGLE)
            return self._read_safetensors({ST_SINGLE: path}, None)
        loose = sorted((p.name for p in root.glob("*.safetensors")), key=natural_key)
        if loose:
            paths = {f: _check_plain_file(root, self._contain, f, f) for f in loose}
            return self._read_safetensors(paths, None)
        pickled = (root / PT_INDEX).exists() or (root / PT_SINGLE).exists() or any(root.glob("*.bin"))
        if pickled:
            if not self._allow_pickle:
                raise CheckpointError(
                    f"{root}: holds only pickled .bin weights, which can run code when loaded; "
                    "convert them to safetensors, or pass --allow-pickle to read them with "
                    "torch.load(weights_only=True)"
                )
            return self._read_pickle()
        raise CheckpointError(f"{root}: no weights found (expected {ST_SINGLE} or {ST_INDEX})")

    def _read_safetensors(self, paths: dict[str, Path], weight_map: dict[str, str] | None) -> _Layout:
        entries: dict[str, TensorInfo] = {}
        offsets: dict[str, TensorEntry] = {}
        starts: dict[str, int] = {}
        for fname, path in paths.items():
            header, _meta, starts[fname] = read_header(path)
            for name, e in header.items():
                if name in entries:
                    raise CheckpointError(
                        f"{self.root}: tensor {name!r} appears in two shards ({entries[name].file} and {fname}); the "
                        "checkpoint is ambiguous"
                    )
                if weight_map is not None and weight_map.get(name) != fname:
                    where = weight_map.get(name)
                    why = f"the index maps it to {where}" if where else "the index does not list it"
                    raise CheckpointError(
                        f"{self.root}: tensor {name!r} is stored in {fname} but {why}; fix {ST_INDEX}"
                    )
                entries[name] = TensorInfo(name, e.shape, ST_TO_TORCH[e.dtype], fname)
                offsets[name] = e
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(entries), key=natural_key)
            if missing:
                more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
                raise CheckpointError(
                    f"{self.root}: tensor {missing[0]!r}{more} is listed in {ST_INDEX} but missing from "
                    f"{weight_map[missing[0]]}"
                )
        return _Layout(files=list(paths), entries=entries, offsets=offsets, data_start=starts)

    def _read_pickle(self) -> _Layout:
        root = self.root
        if (root / PT_INDEX).exists():
            wm = _load_index(root, PT_INDEX)
            files = sorted(set(wm.values()), key=natural_key)
            for f in files:
                _check_plain_file(root, self._contain, f, PT_INDEX)
        else:
            files = sorted((p.name for p in root.glob("*.bin")), key=natural_key)
        entries: dict[str, TensorInfo] = {}
        for fname in files:
            for name, t in self._pickle_file(fname).items():
                if name in entries:
                    raise CheckpointError(
                        f"{root}: tensor {name!r} appears in two shards ({entries[name].file} and {fname})"
                    )
                entries[name] = TensorInfo(name, tuple(t.shape), t.dtype, fname)
        return _Layout(files=files, entries=entries, pickle=True)

    def _pickle_file(self, fname: str) -> dict[str, torch.Tensor]:
        if fname not in self._pickle_cache:
            try:
                sd = torch.load(self.root / fname, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for bad pickles
                raise CheckpointError(
                    f"{self.root / fname}: cannot load with weights_only=True ({type(e).__name__}: "
                    f"{str(e).splitlines()[0]})"
                ) from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{self.root / fname}: expected a state dict, found {type(sd).__name__}")
            self._pickle_cache[fname] = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        return self._pickle_cache[fname]

    # ---- metadata -------------------------------------------------------------------------
    @property
    def is_pickle(self) -> bool:
        return self._layout.pickle

    @property
    def files(self) -> list[str]:
        return list(self._layout.files)

    @property
    def names(self) -> list[str]:
        return sorted(self._layout.entries, key=natural_key)

    def __contains__(self, name: str) -> bool:
        return name in self._layout.entries

    def __len__(self) -> int:
        return len(self._layout.entries)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._layout.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: no tensor named {name!r}") from None

    def infos(self) -> Iterator[TensorInfo]:
        for n in self.names:
            yield self._layout.entries[n]

    def file_order(self) -> list[str]:
        """Names in on-disk order (file, then offset): the order that reads sequentially."""
        order = {f: i for i, f in enumerate(self._layout.files)}
        off = self._layout.offsets
        return sorted(
            self._layout.entries,
            key=lambda n: (order[self._layout.entries[n].file], off[n].begin if n in off else 0, natural_key(n)),
        )

    @cached_property
    def config_dict(self) -> dict[str, Any]:
        path = self.root / "config.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(
                f"{self.root}: no config.json; weightsmith needs the model's Hugging Face config"
            ) from None
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None

    @cached_property
    def config(self):
        """The transformers config object (raises a clear error for unknown model types)."""
        from transformers import AutoConfig

        mt = self.config_dict.get("model_type")
        try:
            return AutoConfig.from_pretrained(self.root)
        except (
            Exception
        ) as e:  # unknown model type, or transformers' own validation (a zero head count divides by zero)
            from weightsmith.arch import supported_model_types, supports

            if isinstance(e, (ValueError, KeyError)) and mt not in supported_model_types():
                raise UnsupportedError(
                    f"{self.root / 'config.json'}: model_type {mt!r} is not known to this transformers version "
                    f"({str(e).splitlines()[0][:120]}); weightsmith supports {', '.join(supported_model_types())}"
                ) from None
            reason = supports(self.config_dict)
            why = (
                reason
                or f"transformers refuses it ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
            )
            raise CheckpointError(f"{self.root / 'config.json'}: {why}; fix config.json") from None

    @cached_property
    def manifest(self) -> dict | None:
        path = self.root / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except ValueError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None

    @property
    def fp8_block(self) -> tuple[int, int]:
        qc = self.config_dict.get("quantization_config") or {}
        b = qc.get("weight_block_size") or [128, 128]
        return int(b[0]), int(b[1])

    def is_fp8(self, name: str) -> bool:
        return self.info(name).dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    def scale_of(self, name: str) -> str | None:
        """The `weight_scale_inv` tensor paired with an fp8 weight, if any."""
        s = fp8.scale_name(name)
        return s if s in self._layout.entries else None

    def aux_files(self) -> list[str]:
        """Non-weight files (tokenizer, generation config, chat template, ...) to carry into outputs."""
        skip = {ST_INDEX, PT_INDEX, MANIFEST, "config.json", "README.md"}
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(".") or p.name in skip or p.name.endswith(WEIGHT_SUFFIXES) or not p.is_file():
                continue
            out.append(p.name)
        return out

    # ---- data -----------------------------------------------------------------------------
    def _fd(self, fname: str) -> int:
        with self._fd_lock:
            fd = self._fds.get(fname)
            if fd is None:
                try:
                    fd = self._fds[fname] = os.open(self.root / fname, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{self.root / fname}: cannot open ({e.strerror})") from None
            return fd

    def _pread(self, name: str) -> torch.Tensor:
        info = self._layout.entries[name]
        e = self._layout.offsets[name]
        buf = torch.empty(e.nbytes, dtype=torch.uint8)
        if e.nbytes:
            pread_exact(
                self._fd(info.file), buf, self._layout.data_start[info.file] + e.begin, self.root / info.file, name
            )
        return buf.view(info.dtype).reshape(info.shape) if info.shape else buf.view(info.dtype).reshape(())

    def close(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def get(
        self, name: str, *, dtype: torch.dtype | None = None, dequantize: bool = False, check_finite: bool = True
    ) -> torch.Tensor:
        """One tensor. `dequantize=True` applies fp8 block scales (result fp32 unless `dtype`).
        A floating tensor holding NaN or Inf is refused, naming it (a pass would otherwise blame
        whichever output it first spreads to); `check_finite=False` is for byte-exact copies."""
        info = self.info(name)
        if self._layout.pickle:
            t = self._pickle_file(info.file)[name].contiguous()
        else:
            t = self._pread(name)
        if check_finite and t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) and t.numel():
            lo, hi = torch.aminmax(t.reshape(-1))
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise CheckpointError(
                    f"{self.root / info.file}: input tensor {name}: contains NaN or Inf; the checkpoint is damaged "
                    "(re-download or re-create it)"
                )
        if dequantize and info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            s = self.scale_of(name)
            if s is None:
                raise CheckpointError(
                    f"{self.root}: fp8 tensor {name!r} has no {fp8.scale_name(name)!r} to dequantize it with"
                )
            t = fp8.dequantize_blockwise(t, self.get(s), self.fp8_block, dtype or torch.float32)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t

    def raw_span(self, name: str) -> tuple[int, int, int] | None:
        """(open fd, byte offset, byte count) of a tensor's stored bytes, for kernel-side copies
        (os.copy_file_range); None for pickled checkpoints."""
        if self._layout.pickle:
            return None
        info = self._layout.entries[name]
        e = self._layout.offsets[name]
        return self._fd(info.file), self._layout.data_start[info.file] + e.begin, e.nbytes

    def read_raw(self, name: str) -> memoryview:
        """The tensor's bytes exactly as stored (for byte-exact copies)."""
        t = self.get(name, check_finite=False)
        return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.root)!r}, tensors={len(self)}, files={len(self.files)})"
