"""Activation storage for the layer-wise engine: in RAM, or memory-mapped files when too large."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch


class ActivationStore:
    """N x L x H activations. File-backed (`torch.from_file`, shared mmap) when `directory` is given."""

    def __init__(
        self, n: int, seq: int, hidden: int, dtype: torch.dtype = torch.float32, directory: str | Path | None = None
    ):
        self.shape = (n, seq, hidden)
        self.dtype = dtype
        self.path: Path | None = None
        numel = n * seq * hidden
        if directory is None:
            self.data = torch.empty(self.shape, dtype=dtype)
        else:
            fd, name = tempfile.mkstemp(prefix="acts-", suffix=".bin", dir=directory)
            os.close(fd)
            self.path = Path(name)
            os.truncate(self.path, numel * torch.empty((), dtype=dtype).element_size())
            self.data = torch.from_file(str(self.path), shared=True, size=numel, dtype=dtype).view(self.shape)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def batches(self, batch_size: int):
        for s in range(0, self.shape[0], batch_size):
            yield slice(s, min(s + batch_size, self.shape[0])), self.data[s : s + batch_size]

    def close(self) -> None:
        self.data = torch.empty(0)
        if self.path is not None:
            try:
                self.path.unlink()
            except OSError:
                pass
            self.path = None

    def __del__(self):
        self.close()


class OffloadPolicy:
    """Decide where activations live: RAM while two stores fit in the budget, else a temp directory."""

    def __init__(self, mode: str = "auto", directory: str | Path | None = None, budget_bytes: int | None = None):
        if mode not in ("auto", "ram", "disk"):
            raise ValueError(f"offload mode {mode!r}: choose auto, ram or disk")
        self.mode = mode
        self._dir = Path(directory) if directory else None
        self._tmp: str | None = None
        if budget_bytes is None:
            import psutil

            budget_bytes = int(psutil.virtual_memory().available * 0.4)
        self.budget = budget_bytes

    def directory_for(self, store_bytes: int) -> Path | None:
        if self.mode == "ram" or (self.mode == "auto" and 2 * store_bytes <= self.budget):
            return None
        if self._dir is not None:
            self._dir.mkdir(parents=True, exist_ok=True)
            return self._dir
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="weightsmith-acts-")
        return Path(self._tmp)

    def cleanup(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
