// weightsmith low-bit GEMM for CUDA (sm_80+): Y[M,N] = X[M,K] * W[K,N], W in weightsmith's
// bit-plane layout (weightsmith/kernels/layout.py): per plane int32 [K/P, N], P = 32/width codes
// per word, k and k+P/2 in neighbouring bit fields.
//
// Design (Marlin-style where it matters for memory-bound decoding):
//  - split-K over a 2-D grid: blockIdx.x = N tile, blockIdx.z = K slice, so small M still fills
//    every SM; partial sums are reduced with fp32 atomics into a workspace;
//  - a STAGES-deep cp.async pipeline streams the packed weight tile and the X tile of the next
//    k-steps into shared memory while the current one is dequantized and multiplied;
//  - dequantization in registers with bit tricks: one shift + mask per plane, and for fp16 the
//    0x6400 exponent trick (a code c becomes the half 1024 + c with one OR, no int->float
//    conversion); scales and scaled zeros applied with packed half2 / bfloat162 FMAs;
//  - tensor cores through WMMA m16n16k16 (fp16 or bf16 inputs, fp32 accumulators).
// Compile-checked for sm_80 and sm_90 in CI (tests/kernels/test_cuda_compile.py); GPU tests and
// benchmarks run where a GPU is present.

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

namespace weightsmith {

using namespace nvcuda;

constexpr int BM = 16;       // rows of X per tile (WMMA m)
constexpr int BN = 64;       // output columns per block (4 warps x 16)
constexpr int BK = 64;       // k per pipeline stage
constexpr int STAGES = 3;    // cp.async pipeline depth
constexpr int THREADS = 128;

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  int bytes = pred ? 16 : 0;  // zero-fill beyond the edge
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <typename T> struct Num;
template <> struct Num<half> {
  static __device__ __forceinline__ float to_float(half v) { return __half2float(v); }
  static __device__ __forceinline__ half from_float(float v) { return __float2half_rn(v); }
  // code c (< 1024) -> half(c) with the exponent trick: 0x6400 is 1024.0; OR-ing c into its
  // mantissa gives 1024 + c exactly; subtracting 1024 leaves c.
  static __device__ __forceinline__ half from_code(uint32_t c) {
    return __hsub(__ushort_as_half(static_cast<unsigned short>(0x6400u | c)), __ushort_as_half(0x6400u));
  }
};
template <> struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  // bf16 has 7 mantissa bits: 0x4300 is 128.0, exact for codes < 128 (all 2/3/4-bit codes; 8-bit
  // codes >= 128 take the integer path).
  static __device__ __forceinline__ __nv_bfloat16 from_code(uint32_t c) {
    if (c < 128u) {
      return __hsub(__ushort_as_bfloat16(static_cast<unsigned short>(0x4300u | c)), __ushort_as_bfloat16(0x4300u));
    }
    return __float2bfloat16_rn(static_cast<float>(c));
  }
};

template <int WIDTH>
__device__ __forceinline__ uint32_t field(uint32_t word, int j) {
  constexpr int P = 32 / WIDTH;
  constexpr int HALF = P / 2;
  const int slot = 2 * (j % HALF) + j / HALF;  // layout.perm
  return (word >> (WIDTH * slot)) & ((1u << WIDTH) - 1u);
}

// One block: BN output columns, all BM-row tiles of X it is given (grid.y), one K slice (grid.z).
template <typename T, int BITS, int W0, int W1, bool SYM>
__global__ void __launch_bounds__(THREADS) quant_gemm_kernel(
    const T* __restrict__ x, const int32_t* __restrict__ p0, const int32_t* __restrict__ p1,
    const T* __restrict__ scales, const T* __restrict__ zeros_scaled, float* __restrict__ work,
    int M, int N, int K, int group_size, int k_per_split) {
  constexpr int P0 = 32 / W0;
  constexpr int P1 = W1 > 0 ? 32 / W1 : 1;
  constexpr int WORDS0 = BK / P0;  // rows of plane-0 words per stage
  constexpr int WORDS1 = W1 > 0 ? BK / P1 : 0;

  __shared__ __align__(16) T xs[STAGES][BM][BK];
  __shared__ __align__(16) int32_t w0s[STAGES][WORDS0][BN];
  __shared__ __align__(16) int32_t w1s[STAGES][WORDS1 > 0 ? WORDS1 : 1][BN];
  __shared__ __align__(32) T ws[BK][BN];  // dequantized tile for the tensor cores

  const int n0 = blockIdx.x * BN;
  const int m0 = blockIdx.y * BM;
  const int k_begin = blockIdx.z * k_per_split;
  const int k_end = min(K, k_begin + k_per_split);
  const int steps = (k_end - k_begin + BK - 1) / BK;
  const int tid = threadIdx.x;
  const int warp = tid / 32;

  auto load_stage = [&](int stage, int step) {
    const int k0 = k_begin + step * BK;
    // X tile: BM x BK elements of T, 16-byte chunks
    constexpr int XCHUNKS = BM * BK * sizeof(T) / 16;
    for (int c = tid; c < XCHUNKS; c += THREADS) {
      const int row = c / (BK * sizeof(T) / 16);
      const int col = (c % (BK * sizeof(T) / 16)) * (16 / sizeof(T));
      const bool ok = (m0 + row) < M && (k0 + col) < k_end;
      const T* src = x + static_cast<size_t>(ok ? m0 + row : 0) * K + (ok ? k0 + col : 0);
      cp_async16(&xs[stage][row][col], src, ok);
    }
    // packed weights: WORDS x BN int32, 4 per chunk
    for (int c = tid; c < WORDS0 * BN / 4; c += THREADS) {
      const int row = c / (BN / 4);
      const int col = (c % (BN / 4)) * 4;
      const bool ok = (k0 / P0 + row) < (k_end / P0) && (n0 + col) < N;
      cp_async16(&w0s[stage][row][col], p0 + static_cast<size_t>(ok ? k0 / P0 + row : 0) * N + (ok ? n0 + col : 0), ok);
    }
    if constexpr (W1 > 0) {
      for (int c = tid; c < WORDS1 * BN / 4; c += THREADS) {
        const int row = c / (BN / 4);
        const int col = (c % (BN / 4)) * 4;
        const bool ok = (k0 / P1 + row) < (k_end / P1) && (n0 + col) < N;
        cp_async16(&w1s[stage][row][col], p1 + static_cast<size_t>(ok ? k0 / P1 + row : 0) * N + (ok ? n0 + col : 0), ok);
      }
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);

  // prologue: fill STAGES-1 stages
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) load_stage(s, s);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    const int stage = step % STAGES;
    if (step + STAGES - 1 < steps) load_stage((step + STAGES - 1) % STAGES, step + STAGES - 1);
    cp_async_commit();
    cp_async_wait<STAGES - 1>();
    __syncthreads();

    // dequantize the stage's BK x BN tile into ws (each thread: whole columns of a word row)
    const int k0 = k_begin + step * BK;
    for (int e = tid; e < BK * BN; e += THREADS) {
      const int kk = e / BN;
      const int nn = e % BN;
      const int k = k0 + kk;
      const int n = n0 + nn;
      T v = Num<T>::from_float(0.0f);
      if (k < k_end && n < N) {
        uint32_t c = field<W0>(static_cast<uint32_t>(w0s[stage][kk / P0][nn]), kk % P0);
        if constexpr (W1 > 0) c |= field<W1>(static_cast<uint32_t>(w1s[stage][kk / P1][nn]), kk % P1) << W0;
        const int g = k / group_size;
        const T s = scales[static_cast<size_t>(g) * N + n];
        const T q = Num<T>::from_code(c);
        if constexpr (SYM) {
          const T z = Num<T>::from_code(1u << (BITS - 1));
          v = __hmul(__hsub(q, z), s);
        } else {
          v = __hsub(__hmul(q, s), zeros_scaled[static_cast<size_t>(g) * N + n]);
        }
      }
      ws[kk][nn] = v;
    }
    __syncthreads();

    // tensor cores: warp w owns columns [16w, 16w+16) of the tile
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
      wmma::load_matrix_sync(a, &xs[stage][0][kk], BK);
      wmma::load_matrix_sync(b, &ws[kk][warp * 16], BN);
      wmma::mma_sync(acc, a, b, acc);
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  // split-K reduction into the fp32 workspace
  __shared__ __align__(32) float out[BM][BN];
  wmma::store_matrix_sync(&out[0][warp * 16], acc, BN, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += THREADS) {
    const int r = e / BN, c = e % BN;
    if (m0 + r < M && n0 + c < N) atomicAdd(&work[static_cast<size_t>(m0 + r) * N + n0 + c], out[r][c]);
  }
}

template <typename T>
__global__ void finish_kernel(const float* __restrict__ work, const T* __restrict__ bias, T* __restrict__ y, int M, int N) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < M * N) {
    float v = work[i];
    if (bias != nullptr) v += Num<T>::to_float(bias[i % N]);
    y[i] = Num<T>::from_float(v);
  }
}

template <typename T, int BITS, int W0, int W1, bool SYM>
void launch(const T* x, const int32_t* p0, const int32_t* p1, const T* s, const T* zs, float* work, T* y, const T* bias,
            int M, int N, int K, int group_size, int sms, cudaStream_t stream) {
  const dim3 tiles((N + BN - 1) / BN, (M + BM - 1) / BM, 1);
  // split K so that the grid covers every SM about twice (striped partition for small M)
  int splits = max(1, min(K / BK, (2 * sms + tiles.x * tiles.y - 1) / (tiles.x * tiles.y)));
  int k_per_split = ((K + splits - 1) / splits + BK - 1) / BK * BK;
  splits = (K + k_per_split - 1) / k_per_split;
  const dim3 grid(tiles.x, tiles.y, splits);
  cudaMemsetAsync(work, 0, sizeof(float) * static_cast<size_t>(M) * N, stream);
  quant_gemm_kernel<T, BITS, W0, W1, SYM><<<grid, THREADS, 0, stream>>>(x, p0, p1, s, zs, work, M, N, K, group_size, k_per_split);
  finish_kernel<T><<<(M * N + 255) / 256, 256, 0, stream>>>(work, bias, y, M, N);
}

// Instantiated combinations: bits 2 (2), 3 (2+1), 4 (4), 8 (8); symmetric or with zeros.
template <typename T>
void dispatch(int bits, bool sym, const T* x, const int32_t* p0, const int32_t* p1, const T* s, const T* zs, float* work, T* y,
              const T* bias, int M, int N, int K, int group_size, int sms, cudaStream_t stream) {
#define WS_CASE(B, A0, A1)                                                                                        \
  if (bits == B) {                                                                                                \
    if (sym) launch<T, B, A0, A1, true>(x, p0, p1, s, zs, work, y, bias, M, N, K, group_size, sms, stream);      \
    else launch<T, B, A0, A1, false>(x, p0, p1, s, zs, work, y, bias, M, N, K, group_size, sms, stream);         \
    return;                                                                                                       \
  }
  WS_CASE(2, 2, 0)
  WS_CASE(3, 2, 1)
  WS_CASE(4, 4, 0)
  WS_CASE(8, 8, 0)
#undef WS_CASE
}

template void dispatch<half>(int, bool, const half*, const int32_t*, const int32_t*, const half*, const half*, float*, half*,
                             const half*, int, int, int, int, int, cudaStream_t);
template void dispatch<__nv_bfloat16>(int, bool, const __nv_bfloat16*, const int32_t*, const int32_t*, const __nv_bfloat16*,
                                      const __nv_bfloat16*, float*, __nv_bfloat16*, const __nv_bfloat16*, int, int, int, int, int,
                                      cudaStream_t);

}  // namespace weightsmith
