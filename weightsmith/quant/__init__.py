"""Weight-only low-bit quantization: RTN and GPTQ grids, on-disk formats, runtime modules."""

from weightsmith.passes import make_callable as _make_callable

_make_callable(__name__, "quant")  # weightsmith.quant(src, dst, config) runs the pass (see weightsmith.app.api)
