// Python binding of weightsmith's Marlin-style CUDA GEMM (built just-in-time by kernels/cuda_ext.py).
// Only c10/cuda and the CUDA runtime (no cuBLAS/cuSPARSE headers), so CI can syntax-check it with
// a bare nvcc toolkit and the CPU torch wheel's headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/extension.h>

#include <map>
#include <mutex>
#include <utility>

#include "quant_gemm.cuh"

namespace {

// Split-K arrival counters, one buffer per (device, stream): zeroed once, and every launch leaves
// them zero again (the last block of each column tile resets its counter).
torch::Tensor counters_for(const torch::Device& device, cudaStream_t stream, int64_t n) {
  static std::mutex mu;
  static std::map<std::pair<int, cudaStream_t>, torch::Tensor> buffers;
  std::lock_guard<std::mutex> lock(mu);
  auto& t = buffers[{device.index(), stream}];
  if (!t.defined() || t.numel() < n) t = torch::zeros({std::max<int64_t>(n, 1024)}, torch::dtype(torch::kInt32).device(device));
  return t;
}

template <typename T>
void run(int bits, bool sym, weightsmith::Args a, int sms, cudaStream_t stream, const torch::Tensor& x, const torch::Tensor& y,
         int64_t row_bytes_x, int64_t row_bytes_y) {
  const int M = a.M;
  for (int m0 = 0; m0 < M; m0 += weightsmith::MAX_M) {  // any M: 64-row launches
    weightsmith::Args c = a;
    c.M = std::min(weightsmith::MAX_M, M - m0);
    c.x = static_cast<const char*>(a.x) + m0 * row_bytes_x;
    c.y = static_cast<char*>(a.y) + m0 * row_bytes_y;
    c.plan_only = true;
    int splits = 1;
    cudaError_t e = weightsmith::dispatch<T>(bits, sym, c, sms, stream, &splits);
    TORCH_CHECK(e == cudaSuccess, "weightsmith quant_gemm: planning failed: ", cudaGetErrorString(e));
    torch::Tensor partial;
    if (splits > 1) {
      partial = torch::empty({splits, c.M, c.N}, x.options().dtype(torch::kFloat32));
      c.partial = partial.data_ptr<float>();
    }
    c.plan_only = false;
    e = weightsmith::dispatch<T>(bits, sym, c, sms, stream, &splits);
    TORCH_CHECK(e == cudaSuccess, "weightsmith quant_gemm: launch failed: ", cudaGetErrorString(e));
  }
}

}  // namespace

torch::Tensor quant_gemm(torch::Tensor x, torch::Tensor p0, c10::optional<torch::Tensor> p1, torch::Tensor scales,
                         c10::optional<torch::Tensor> zeros_scaled, c10::optional<torch::Tensor> bias, int64_t bits,
                         int64_t group_size, int64_t n) {
  TORCH_CHECK(x.is_cuda() && p0.is_cuda() && scales.is_cuda(), "weightsmith quant_gemm: tensors must be on a CUDA device");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "weightsmith quant_gemm: x must be a contiguous [M, K] matrix");
  TORCH_CHECK(x.scalar_type() == scales.scalar_type(), "weightsmith quant_gemm: x and scales must share a dtype");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4, "weightsmith quant_gemm: bits must be 2, 3 or 4 (8-bit runs on Triton)");
  TORCH_CHECK((bits == 3) == p1.has_value(), "weightsmith quant_gemm: 3-bit weights take a 1-bit plane p1, others none");
  const int64_t M = x.size(0), K = x.size(1), N = n;
  TORCH_CHECK(K % 64 == 0 && N % 16 == 0, "weightsmith quant_gemm: K must be a multiple of 64 and N of 16, got K=", K, " N=", N);
  TORCH_CHECK(group_size >= 32 && group_size % 16 == 0 && K % group_size == 0,
              "weightsmith quant_gemm: group_size must be >= 32, a multiple of 16 and divide K (per-channel: K), got ", group_size);
  const int64_t w0 = bits == 4 ? 4 : 2;
  TORCH_CHECK(p0.is_contiguous() && p0.scalar_type() == torch::kInt32 && p0.numel() == K / 64 * N / 16 * 32 * w0,
              "weightsmith quant_gemm: p0 must be a contiguous int32 tensor in the fragment layout (marlin_layout.repack)");
  if (p1) TORCH_CHECK(p1->is_contiguous() && p1->scalar_type() == torch::kInt32 && p1->numel() == K / 64 * N / 16 * 32, "weightsmith quant_gemm: bad p1");
  TORCH_CHECK(scales.is_contiguous() && scales.size(0) == K / group_size && scales.size(1) == N, "weightsmith quant_gemm: scales must be [K/group_size, N]");
  if (zeros_scaled) TORCH_CHECK(zeros_scaled->is_contiguous() && zeros_scaled->sizes() == scales.sizes() && zeros_scaled->scalar_type() == x.scalar_type(),
                                "weightsmith quant_gemm: zeros_scaled must match scales");
  if (bias) TORCH_CHECK(bias->is_contiguous() && bias->numel() == N && bias->scalar_type() == x.scalar_type(), "weightsmith quant_gemm: bias must be [N] in x's dtype");
  for (const void* ptr : {x.data_ptr(), p0.data_ptr(), scales.data_ptr()})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, "weightsmith quant_gemm: inputs must be 16-byte aligned");

  const c10::cuda::CUDAGuard guard(x.device());
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.device().index()) == cudaSuccess,
              "weightsmith quant_gemm: cannot read the device's SM count");
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  auto counters = counters_for(x.device(), stream, (N + 127) / 128);

  weightsmith::Args a{};
  a.x = x.data_ptr();
  a.p0 = reinterpret_cast<const uint32_t*>(p0.data_ptr<int32_t>());
  a.p1 = p1 ? reinterpret_cast<const uint32_t*>(p1->data_ptr<int32_t>()) : nullptr;
  a.scales = scales.data_ptr();
  a.zeros_scaled = zeros_scaled ? zeros_scaled->data_ptr() : nullptr;
  a.bias = bias ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.partial = nullptr;
  a.counters = counters.data_ptr<int>();
  a.M = static_cast<int>(M);
  a.N = static_cast<int>(N);
  a.K = static_cast<int>(K);
  a.group_size = static_cast<int>(group_size);
  a.max_splits = 32;
  const bool sym = !zeros_scaled.has_value();
  const int64_t esz = x.element_size();
  if (x.scalar_type() == torch::kHalf) {
    run<half>(static_cast<int>(bits), sym, a, sms, stream, x, y, K * esz, N * esz);
  } else if (x.scalar_type() == torch::kBFloat16) {
    run<__nv_bfloat16>(static_cast<int>(bits), sym, a, sms, stream, x, y, K * esz, N * esz);
  } else {
    TORCH_CHECK(false, "weightsmith quant_gemm: activations must be fp16 or bf16, got ", x.scalar_type());
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_gemm", &quant_gemm, "weightsmith Marlin-style low-bit GEMM (fragment layout, see marlin_layout.py)");
}
