// Interface between the CUDA kernel (quant_gemm.cu) and its torch binding (binding.cpp).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace weightsmith {

constexpr int MAX_M = 64;  // rows per launch; the binding loops over larger M

struct Args {
  const void* x;             // [M, K] fp16/bf16, row-major, 16-byte aligned
  const uint32_t* p0;        // plane 0 in the fragment layout, [K/64, N/16, 32, w0] int32
  const uint32_t* p1;        // plane 1 (3-bit only), [K/64, N/16, 32, 1] int32, else nullptr
  const void* scales;        // [G, N] activation dtype
  const void* zeros_scaled;  // [G, N] z*s (asymmetric) or nullptr (symmetric zero 2^(b-1))
  const void* bias;          // [N] or nullptr
  void* y;                   // [M, N] output, row stride N
  float* partial;            // [splits, M, N] fp32 split-K workspace (splits > 1)
  int* counters;             // [ceil(N/128)] zeros; the kernel leaves them zero
  int M, N, K, group_size;
  int kblocks_per_split;     // set by the launcher
  int max_splits;            // upper bound on split-K
  bool plan_only;            // compute *splits and return without launching
};

// Launch (or, with a.plan_only, plan) Y = X W for bits in {2, 3, 4}; *splits receives the
// split-K factor (the workspace needs splits * M * N floats when it is > 1).
template <typename T>
cudaError_t dispatch(int bits, bool sym, const Args& a, int sms, cudaStream_t stream, int* splits);

}  // namespace weightsmith
