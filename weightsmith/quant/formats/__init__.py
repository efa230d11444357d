"""On-disk quantized formats, one module each, in a registry keyed by format name."""

from weightsmith.quant.formats import compressed_tensors, gptq_v1  # noqa: F401  (register)
from weightsmith.quant.formats.base import FORMATS, LinearQuant, QuantizedWeight

__all__ = ["FORMATS", "LinearQuant", "QuantizedWeight"]
