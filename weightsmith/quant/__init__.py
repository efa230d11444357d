"""Weight-only low-bit quantization: RTN and GPTQ grids, on-disk formats, runtime modules."""
