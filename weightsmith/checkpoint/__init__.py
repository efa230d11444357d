"""Checkpoint I/O: lazy reader, streaming atomic writer, manifest, GGUF/Hub resolution."""

from weightsmith.checkpoint.reader import Checkpoint, Origin, TensorInfo
from weightsmith.checkpoint.resolve import open_checkpoint
from weightsmith.checkpoint.writer import CheckpointWriter, TensorSpec

__all__ = ["Checkpoint", "CheckpointWriter", "Origin", "TensorInfo", "TensorSpec", "open_checkpoint"]
