"""Low-bit GEMM kernels: a plain PyTorch reference (CPU path and test oracle) and a dispatcher."""
